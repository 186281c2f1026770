"""`models.where: tpu`: the training stages run on a Cloud TPU slice through the tpu/ scripts.

The dry run's every gcloud line is checked against the command table of tests/helpers_gcloud.py
(written from gcloud's reference, not from tpu/gcloud.py); the babysit line must carry the
train command with its paths on the slice's mount, and the copy-back must land in
RUN/models/LABEL. A slow test runs two TPU stages for real against a fake `gcloud` on PATH
that keeps "gs://" in a folder, plays a preemption, and runs the remote train command here.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_gcloud import parse_gcloud

from jaxlm.cli import main
from jaxlm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tpu import babysit  # noqa: E402

TINY_TPU = """\
name: tiny-tpu
corpus: {kind: demo, n_translated: 1500, native_fraction: 0.05, eval_stories: 100, seed: 0}
data: {vocab_size: 2000, seq_len: 32, val_fraction: 0.05}
models:
  presets: [ts-1m]
  pretrain_config: configs/demo/pretrain.yaml
  pretrain_set: ["steps=6", "batch_size=8", "eval.every=3", "eval.batches=1",
                 "checkpoint.every=3", "log.every=2"]
  cpt_config: configs/demo/cpt.yaml
  cpt_set: ["steps=4", "batch_size=8", "eval.batches=1", "checkpoint.every=4", "log.every=2"]
  control: false
  where: tpu
tpu: {name: jaxlm-v5e, zone: us-west4-a, project: my-proj, accelerator: v5e-8, spot: true,
      repo: "https://github.com/org/jaxlm.git", commit: 0123abc, runs: "gs://bkt/runs"}
samples: {n: 4, max_new_tokens: 16}
sae: {enabled: false}
export: false
"""
MOUNT = "/tmp/jaxlm-runs"  # tpu.runs_dir's default: where setup mounts gs://bkt/runs


def _config(tmp_path: Path, text: str = TINY_TPU) -> Path:
    cfg = tmp_path / "tiny-tpu.yaml"
    cfg.write_text(text)
    return cfg


def _dry_run(cfg: Path, workdir: Path, capsys, *extra: str) -> list[str]:
    args = ["pipeline", "--config", str(cfg), "--workdir", str(workdir), "--dry-run", *extra]
    assert main(args) == 0
    return capsys.readouterr().out.splitlines()


def test_dry_run_prints_every_tpu_stages_commands_and_writes_nothing(tmp_path, capsys):
    w = tmp_path / "run"
    lines = _dry_run(_config(tmp_path), w, capsys)
    assert not w.exists()  # no markers, no logs, no results
    # every gcloud line, the pipeline's and (as comments) babysit's and delete's own dry runs
    gcloud = [x.removeprefix("#   ") for x in lines if x.removeprefix("#   ").startswith("gcloud ")]
    cmds = [parse_gcloud(x) for x in gcloud]
    assert len(cmds) > 15
    others = [x for x in lines if not x.startswith(("gcloud ", "#"))]
    assert len(others) == 3 and all(x.startswith(sys.executable) for x in others), others

    # the stages: the data goes up, babysit trains, the workdir comes back to RUN/models/LABEL
    for label, data in (("pretrain-ts-1m", "translated"), ("cpt-ts-1m", "native")):
        head = lines.index(next(x for x in lines if x.startswith(f"# [{label}] would run on the "
                                                                  "TPU slice")))  # fmt: skip
        assert "jaxlm-v5e" in lines[head]
        end = next(i for i in range(head + 1, len(lines)) if lines[i].startswith("# ["))
        stage = lines[head + 1 : end]
        ups = [parse_gcloud(x)[1] for x in stage if x.startswith("gcloud storage rsync")][:-1]
        assert [str(w / "data" / data), f"gs://bkt/runs/run/data/{data}"] in ups
        assert [str(w / "data" / "eval_native"), "gs://bkt/runs/run/data/eval_native"] in ups
        path, pos, flags = parse_gcloud(stage[-1])  # the copy back
        assert path == ("storage", "rsync") and "--delete-unmatched-destination-objects" in flags
        assert pos == [f"gs://bkt/runs/run/models/{label}", str(w / "models" / label)]
        argv = next(shlex.split(x) for x in stage if x.startswith(sys.executable))
        cut = argv.index("--")
        flags_ns = babysit.build_parser().parse_args(argv[2:cut])  # babysit would accept them
        assert flags_ns.name == "jaxlm-v5e" and flags_ns.spot and flags_ns.commit == "0123abc"
        assert flags_ns.runs == "gs://bkt/runs" and flags_ns.run_id == label
        train = argv[cut + 1 :]
        assert train[:2] == ["jaxlm", "train"]
        assert train[train.index("--workdir") + 1] == f"{MOUNT}/run/models/{label}"
        assert train[train.index("--data") + 1] == f"{MOUNT}/run/data/{data}"
        assert train[train.index("--config") + 1] == f"{MOUNT}/run/configs/{label}.yaml"
        assert f"{{path: {MOUNT}/run/data/eval_native}}" in " ".join(train)
        assert "--overwrite" not in train  # a babysat rerun must resume
        # babysit's own dry run: the same command runs on all workers
        ssh = [parse_gcloud(x.removeprefix("#   ")) for x in stage if x.startswith("#   gcloud")]
        run = ssh[-1][2]["--command"]
        assert ssh[-1][0][-1] == "ssh" and shlex.join(train) in run
        if label.startswith("cpt-"):
            assert train[train.index("--init-from") + 1] == f"{MOUNT}/run/models/pretrain-ts-1m"
            assert [
                str(w / "models/pretrain-ts-1m"),
                "gs://bkt/runs/run/models/pretrain-ts-1m",
            ] in ups
        else:  # the first TPU stage shows the slice being created
            assert [c[0][-1] for c in ssh][:2] == ["describe", "create"]
    # then the slice is deleted; local stages are only named
    assert [x for x in lines if x.startswith("#   gcloud compute tpus tpu-vm delete")]
    assert "# [samples-cpt-ts-1m] would run on this machine" in "\n".join(lines)


def test_dry_run_of_a_changed_stage_removes_the_old_remote_workdir(tmp_path, capsys):
    w = tmp_path / "run"
    markers = w / ".stages"
    markers.mkdir(parents=True)
    (markers / "pretrain-ts-1m.json").write_text(json.dumps({"fingerprint": "old"}))
    assert main(["pipeline", "--config", str(_config(tmp_path)), "--workdir", str(w),
                 "--set", "tpu.dry_run=true"]) == 0  # as --dry-run  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    rm = [parse_gcloud(x) for x in lines if x.startswith("gcloud storage rm")]
    assert [pos for _, pos, _ in rm] == [["gs://bkt/runs/run/models/pretrain-ts-1m"]]
    assert sorted(p.name for p in markers.iterdir()) == ["pretrain-ts-1m.json"]  # untouched


def test_plan_says_tpu_and_names_the_slice(tmp_path, capsys):
    assert main(["pipeline", "--config", str(_config(tmp_path)), "--plan"]) == 0
    rows = [x for x in capsys.readouterr().out.splitlines() if x.startswith(("pretrain-", "cpt-"))]
    assert len(rows) == 2
    assert all(x.split()[1] == "tpu" and "TPU slice jaxlm-v5e (v5e-8 in us-west4-a" in x
               for x in rows)  # fmt: skip


@pytest.mark.parametrize("field", ["name", "zone", "repo", "runs"])
def test_a_tpu_config_without_a_required_field_is_refused_in_one_line(field, tmp_path, capsys):
    cfg = _config(tmp_path)
    assert main(["pipeline", "--config", str(cfg), "--plan", "--set", f"tpu.{field}=null"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"tpu.{field} is required with models.where=tpu" in err


def test_tpu_fields_are_checked_only_when_training_runs_there(tmp_path):
    from jaxlm.pipeline.config import load

    cfg = _config(tmp_path, TINY_TPU.replace("where: tpu", "where: local").split("tpu: {")[0])
    assert load(cfg).tpu.name is None  # a local config needs no tpu section
    with pytest.raises(UserError, match="tpu.runs=/data: expected gs://"):
        load(_config(tmp_path), [{"tpu": {"runs": "/data"}}])
    with pytest.raises(UserError, match="tpu: unknown key 'zones'"):
        load(_config(tmp_path), [{"tpu": {"zones": "x"}}])


# --- for real, against a fake gcloud --------------------------------------------------------------

FAKE_GCLOUD = """\
#!{python}
# A stand-in for gcloud: gs://B/P is FAKE/gcs/B/P; the slice is the file FAKE/slice (its state);
# `ssh --command` runs setup as a no-op and the train command here (the first time, it plays a
# preemption instead); every call is logged to FAKE/calls.jsonl.
import json, os, re, shlex, shutil, subprocess, sys
from pathlib import Path

fake = Path(os.environ["FAKE_GCLOUD"])
argv = sys.argv[1:]
with open(fake / "calls.jsonl", "a") as f:
    f.write(json.dumps(argv) + "\\n")
where = lambda u: fake / "gcs" / u[5:] if u.startswith("gs://") else Path(u)
slice_ = fake / "slice"
pos = [a for a in argv[2:] if not a.startswith("-")]
if argv[:2] == ["storage", "rsync"]:
    src, dst = map(where, pos)
    if not src.is_dir():
        sys.exit(f"ERROR: {{pos[0]}} matched no objects or files")
    if "--delete-unmatched-destination-objects" in argv and dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
elif argv[:2] == ["storage", "cp"]:
    where(pos[1]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(where(pos[0]), where(pos[1]))
elif argv[:2] == ["storage", "rm"]:
    if not where(pos[0]).exists():
        sys.exit("ERROR: (gcloud.storage.rm) The following URLs matched no objects or files:")
    shutil.rmtree(where(pos[0]))
elif argv[:3] == ["compute", "tpus", "tpu-vm"]:
    verb = argv[3]
    if verb == "describe":
        if not slice_.exists():
            sys.exit("ERROR: NOT_FOUND")
        print(slice_.read_text())
    elif verb == "create":
        slice_.write_text("READY")
    elif verb == "delete":
        slice_.unlink()
    elif verb == "ssh":
        script = next(a for a in argv if a.startswith("--command="))[len("--command="):]
        if "git clone" in script:  # setup
            sys.exit(0)
        user = shlex.split(re.search(r"\\( (.*) \\) 2>&1 \\| tee", script).group(1))
        assert user[0] == "jaxlm", user
        if not (fake / "preempted").exists():
            (fake / "preempted").touch()
            slice_.write_text("PREEMPTED")
            sys.exit(255)
        sys.exit(subprocess.run([sys.executable, "-m", "jaxlm.cli", *user[1:]]).returncode)
    else:
        sys.exit(f"fake gcloud: {{argv}}")
else:
    sys.exit(f"fake gcloud: {{argv}}")
"""


@pytest.mark.slow
def test_tpu_stages_run_through_babysit_and_copy_the_model_back(tmp_path):
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    gcloud = fake / "bin" / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    mount = fake / "gcs" / "bkt" / "runs"  # the workers' gcsfuse mount of gs://bkt/runs
    cfg = _config(tmp_path, TINY_TPU.replace('runs: "gs://bkt/runs"',
                                             f'runs: "gs://bkt/runs", runs_dir: "{mount}", '
                                             "poll_s: 0.01"))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(FAKE_GCLOUD=str(fake), PATH=f"{fake / 'bin'}:{env['PATH']}", PYTHONPATH=str(ROOT))
    w = tmp_path / "run"
    cmd = [sys.executable, "-m", "jaxlm.cli", "pipeline", "--config", str(cfg), "--workdir",
           str(w), "--only", "corpus,tokenizer,prepare,pretrain-*,cpt-*,samples-cpt-*"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    logs = "".join(p.read_text()[-1500:] for p in sorted((w / "logs").glob("*.log")))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:] + logs

    calls = [json.loads(x) for x in (fake / "calls.jsonl").read_text().splitlines()]
    verbs = [c[1] if c[0] == "storage" else c[3] for c in calls]
    first = verbs[: verbs.index("rsync", verbs.index("ssh"))]
    # data up, describe (missing), create, describe, setup, run (preempted), describe, delete,
    # create, describe, setup, run; then the workdir back
    assert first[first.index("describe") :] == ["describe", "create", "describe", "ssh", "ssh",
                                                "describe", "delete", "create", "describe",
                                                "ssh", "ssh"], verbs  # fmt: skip
    assert verbs[-2:] == ["describe", "delete"] and not (fake / "slice").exists()  # done: deleted

    for label, steps in (("pretrain-ts-1m", 6), ("cpt-ts-1m", 4)):
        local = w / "models" / label
        meta = json.loads((local / "jaxlm_model.json").read_text())
        assert meta["tokenizer"] == str(w / "tokenizer") and meta["tokenizer_sha256"]
        marker = json.loads((w / ".stages" / f"{label}.json").read_text())
        assert marker["result"]["steps"] == steps
        assert any("tpu/babysit.py" in c for c in marker["commands"])
        assert (mount / "run" / "models" / label / "metrics.jsonl").exists()  # trained "there"
    samples = json.loads((w / ".stages" / "samples-cpt-ts-1m.json").read_text())
    assert samples["result"]["english_name_rate"] is not None  # a local stage read it

    n = len(calls)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert again.returncode == 0 and "] running" not in again.stdout, again.stdout
    assert len((fake / "calls.jsonl").read_text().splitlines()) == n  # no gcloud on a rerun
