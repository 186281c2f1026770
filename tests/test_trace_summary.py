"""scripts/trace_summary.py on a small Perfetto trace written here: classes, per-step times, and
each fusion kernel named with its HLO shape and JAX op from the matching dump."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "trace_summary.py"

HLO = """HloModule jit_step
  %loop_add_fusion.7 = bf16[64,512,768]{2,1,0} fusion(%a, %b), kind=kLoop, calls=%fused_add.7, \
metadata={op_name="jit(step)/jvp()/add" stack_frame_id=3}
  %input_reduce_fusion = f32[8192]{0} fusion(%c), kind=kInput, calls=%fused_reduce, \
metadata={op_name="jit(step)/reduce_max"}
"""
OTHER_HLO = """HloModule jit_step
  %loop_add_fusion.7 = f32[2]{0} fusion(%a), kind=kLoop, calls=%x, metadata={op_name="wrong"}
"""


def _trace(path: Path) -> None:
    meta = [
        {"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}
        for pid, name in ((1, "/device:GPU:0"), (9, "/host:CPU"))
    ]
    kernels = [("nvjet_sm90_tst_128x128_h_bz_TNT", 3000), ("cudnn_sdpa_flash_fprop", 1000),
               ("loop_add_fusion_7", 400), ("loop_add_fusion_7", 200),
               ("input_reduce_fusion", 100), ("memcpy128", 50)]  # fmt: skip
    events = meta + [{"ph": "X", "pid": 1, "tid": 7, "name": n, "ts": i, "dur": d}
                     for i, (n, d) in enumerate(kernels)]  # fmt: skip
    events.append({"ph": "X", "pid": 9, "tid": 1, "name": "loop_add_fusion_7", "ts": 0, "dur": 1e6})
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def test_summary_classes_steps_and_hlo_names(tmp_path):
    _trace(tmp_path / "t.json.gz")
    (tmp_path / "a.txt").write_text(OTHER_HLO)
    (tmp_path / "b.txt").write_text(HLO)
    argv = [sys.executable, str(SCRIPT), str(tmp_path / "t.json.gz"), "--steps", "2",
            "--hlo", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]  # fmt: skip
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    classes = {r["class"]: r["ms_per_step"] for r in rows if "class" in r}
    assert classes == {"matmul": 1.5, "attention": 0.5, "other": 0.375}  # host events left out
    top = [r for r in rows if "kernel" in r]
    assert [r["kernel"] for r in top] == ["loop_add_fusion_7", "input_reduce_fusion", "memcpy128"]
    assert top[0]["ms_per_step"] == 0.3 and top[0]["calls_per_step"] == 1.0
    assert top[0]["hlo"] == "bf16[64,512,768]{2,1,0}  jit(step)/jvp()/add"  # from b.txt, not a.txt
    assert top[2]["hlo"] == ""


def test_a_trace_without_gpu_kernels_says_so(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"traceEvents": []}))
    argv = [sys.executable, str(SCRIPT), str(tmp_path / "t.json"), "--steps", "1"]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "no kernels on a /device:GPU stream" in r.stderr
