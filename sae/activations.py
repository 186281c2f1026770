"""An activation store: MLP activations of a jaxlm model over prepared data, shuffled, in batches.

The SAELens idea (`sae_lens/training/activations_store.py`, `mixing_buffer.py`): run the model on
`n_batches_in_buffer` batches of `store_batch_size_prompts` contexts, pool their token activations
[M, F] in a buffer, shuffle it, and serve it as SAE batches of `train_batch_size_tokens` rows.

Rows of a DATADIR are seq_len + 1 tokens; the first seq_len are cut into seq_len // context_size
contexts of `context_size` tokens (a tail shorter than that is dropped), and each context is run
through a jit'd `model.mlp_activations(tokens, layers)`, which stops after the last layer asked
for. Several layers come from that one forward (EleutherAI sparsify's way of training every layer's
SAE in one pass; SAELens reads one hook per run): the store then serves [L, N, F] batches, every
layer's buffer permuted by the same permutation, so layer l's rows are exactly the batches a store
of layer l alone (same seed) serves.

One difference from SAELens: each buffer is shuffled and served whole (SAELens keeps half for
mixing with the next fill). That makes the store's state small and exact: the loader's state at
the start of the current fill, the fill's number and how many batches of it were served. Resuming
re-runs that fill (the same rows, the same permutation from `fold_in(seed, fill)`) and skips the
served batches, so a resumed run sees bitwise the batches an uninterrupted one would (on CPU).

Read-ahead (`prefetch`): while a fill is served, the next fill's forwards are read and dispatched a
few at a time (all of them by the fill's last batch), so the call that starts a fill dispatches
only the shuffle: the host never stops for a whole fill's loader reads and dispatches while an
accelerator's queue runs dry. The next fill's rows are still the next n loader batches, whenever
they are read, so the state above (and resuming) is unchanged. By default on accelerators only:
on CPU the "device" is the host's own cores, so there is nothing to overlap (measured with
scripts/bench_sae_layers.py: the same loop time with and without, and a CPU program whose inputs
are ready runs in the dispatching call, so the read-ahead only moves forwards into earlier calls).
Never on several CPU devices, where a fill's programs must run alone (`_serial`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxlm.errors import UserError
from jaxlm.model import GPTNeo
from jaxlm.sharding import batch_sharding, logical_to_pspec, use_mesh
from sae.base import SAE_RULES


def capture_fn(model: GPTNeo, layer: int | Sequence[int]):
    """A jit'd (params, tokens [B, T]) -> float32 MLP hidden [B * T, F] of `layer`; with a
    sequence of layers, [L, B * T, F] of each (in that order) from one forward."""
    graphdef, params = nnx.split(model, nnx.Param)
    layers = (layer,) if isinstance(layer, int) else tuple(layer)
    what = "model.layer" if isinstance(layer, int) else "model.layers"
    for i in layers:
        if not 0 <= i < model.cfg.n_layers:
            raise UserError(f"{what}={i}: the model has layers 0..{model.cfg.n_layers - 1}")

    @jax.jit
    def run(params, tokens_bt):
        h = nnx.merge(graphdef, params).mlp_activations(tokens_bt, layers)  # {l: [B, T, F]}
        h_lnf = jnp.stack([h[i].reshape(-1, h[i].shape[-1]) for i in layers])  # [L, B * T, F]
        h_lnf = h_lnf.astype(jnp.float32)
        return h_lnf[0] if isinstance(layer, int) else h_lnf

    return partial(run, params)


@partial(jax.jit, static_argnums=(2,))
def _shuffle(acts: list[jax.Array], key: jax.Array, batch: int) -> jax.Array:
    """A fill's forwards [L, B * T, F] pooled [L, M, F], permuted along M (one permutation for
    every layer) and cut into whole batches: [L, M // batch, batch, F]."""
    buffer_lmf = jnp.concatenate(acts, axis=1)
    L, M, F = buffer_lmf.shape
    perm = jax.random.permutation(key, M)[: M // batch * batch]
    return buffer_lmf[:, perm].reshape(L, -1, batch, F)


@partial(jax.jit, static_argnums=(2, 3))
def _take(batches_lkbf: jax.Array, i: jax.Array, sharding, stacked: bool) -> jax.Array:
    """Batch i of a fill, [L, batch, F] (or [batch, F] for one layer, not `stacked`), each device
    slicing its own rows: no collective. (Eager `batches[i]` compiled a gather with an
    all-gather; on fake CPU devices it could run beside the SAE step's collectives and deadlock
    XLA's in-process rendezvous.)"""
    out = jax.lax.dynamic_index_in_dim(batches_lkbf, i, 1, keepdims=False)
    out = out if stacked else out[0]
    return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)


class ActivationStore:
    """Iterator of float32 [train_batch_size_tokens, F] activation batches of `layer`, or of
    [L, train_batch_size_tokens, F] batches when `layer` is a sequence of L layers (in its order,
    all from one forward); `get_state`/`set_state`.

    `sources` are (DATADIR, weight) pairs mixed as `jaxlm.data.pipeline.make_loader` mixes them;
    `mesh` shards the model's forward (batch over the data axes) and the served batches (rows over
    `data`); without one everything runs on the default device. `prefetch` reads each next fill
    ahead while the current one is served (None: on accelerators; the module's docstring says why).
    """

    def __init__(
        self,
        model: GPTNeo,
        layer: int | Sequence[int],
        sources: Sequence[tuple[str, float]],
        *,
        context_size: int | None = None,
        store_batch_size_prompts: int = 32,
        n_batches_in_buffer: int = 20,
        train_batch_size_tokens: int = 4096,
        seed: int = 42,
        worker_count: int = 0,
        mesh: Mesh | None = None,
        prefetch: bool | None = None,
    ):
        from jaxlm.data.pipeline import make_loader, read_metadata

        seq_lens = {read_metadata(p)["seq_len"] for p, _ in sources}
        seq_len = min(seq_lens) if seq_lens else 0
        self.context_size = context_size or seq_len
        if not 0 < self.context_size <= seq_len:
            raise UserError(
                f"data.context_size={context_size} must be in 1..{seq_len} (the data's seq_len)"
            )
        per_row = seq_len // self.context_size
        if store_batch_size_prompts % per_row:
            raise UserError(
                f"data.store_batch_size_prompts={store_batch_size_prompts} must be a multiple of "
                f"the {per_row} contexts each row of seq_len {seq_len} gives"
            )
        self.rows_per_forward = store_batch_size_prompts // per_row
        tokens_per_fill = store_batch_size_prompts * self.context_size * n_batches_in_buffer
        if tokens_per_fill < train_batch_size_tokens:
            raise UserError(
                f"a buffer of {tokens_per_fill} tokens (store_batch_size_prompts x context_size x "
                f"n_batches_in_buffer) is smaller than train_batch_size_tokens="
                f"{train_batch_size_tokens}"
            )
        self.stacked = not isinstance(layer, int)  # serve [L, N, F], not [N, F]
        self.layers = (layer,) if isinstance(layer, int) else tuple(layer)
        self.batch = train_batch_size_tokens
        self.n_batches_in_buffer, self.mesh = n_batches_in_buffer, mesh
        self.d_in = model.cfg.d_ff
        self._key = jax.random.key(seed)
        self._loader = make_loader(
            sources,
            split="train",
            batch_size=self.rows_per_forward,
            seed=seed,
            worker_count=worker_count,
            slice_global_batch=True,
        )
        self._capture = capture_fn(model, self.layers)  # [L, B * T, F]
        self._tok_sharding = batch_sharding(mesh, 2) if mesh is not None else None

        def rows_sharded(axes):  # a fill [L, K, batch, F] and one batch: rows over devices
            return None if mesh is None else NamedSharding(mesh, logical_to_pspec(axes, SAE_RULES))

        self._out_sharding = rows_sharded((None, None, "sae_rows", None))
        self._row_sharding = rows_sharded(
            (None, "sae_rows", None) if self.stacked else ("sae_rows", None)
        )
        on_cpu = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform == "cpu"
        # several CPU devices: one program with collectives in flight at a time (see `_serial`)
        self.one_program_at_a_time = on_cpu and mesh is not None and mesh.size > 1
        prefetch = not on_cpu if prefetch is None else prefetch  # read ahead on accelerators
        self.prefetch = prefetch and not self.one_program_at_a_time
        self._fill = 0  # number of the next fill
        self._fill_start: dict | None = None  # loader state where the current fill began
        self._batches: jax.Array | None = None  # [L, K, batch, F] the current fill, shuffled
        self._served = 0
        self._ahead: list[jax.Array] = []  # [L, B * T, F] the next fill's forwards, dispatched
        self._ahead_start: dict | None = None  # loader state where the next fill begins

    def __iter__(self) -> Iterator[jax.Array]:
        return self

    @property
    def refill_due(self) -> bool:
        """The next batch starts a new fill (model forwards, a shuffle across devices)."""
        return self._batches is None or self._served >= self._batches.shape[1]

    @property
    def serial_fill_due(self) -> bool:
        """The next batch starts a fill whose programs must run alone (see `_serial`): a caller
        with its own collective programs in flight lets them finish first."""
        return self.one_program_at_a_time and self.refill_due

    def __next__(self) -> jax.Array:
        if self.refill_due:
            self._refill()
        batches = self._batches
        assert batches is not None  # `_refill` made one
        out = _take(batches, jnp.int32(self._served), self._row_sharding, self.stacked)
        self._served += 1
        if self.prefetch:  # the next fill's forwards, spread over this fill's batches
            K, n = batches.shape[1], self.n_batches_in_buffer
            self._read_ahead(-(-n * self._served // K))
        return out

    def _tokens(self) -> np.ndarray:
        rows = next(self._loader)["tokens"][:, :-1]  # [R, seq_len]: the LM's input positions
        n = rows.shape[1] // self.context_size * self.context_size
        return rows[:, :n].reshape(-1, self.context_size)  # [R * per_row, context_size]

    def _read_ahead(self, upto: int) -> None:
        """Dispatch the next fill's forwards until `upto` of them are (no more than a fill's)."""
        with use_mesh(self.mesh, SAE_RULES):
            while len(self._ahead) < min(upto, self.n_batches_in_buffer):
                if not self._ahead:
                    self._ahead_start = self._loader.get_state()
                tokens = self._tokens()
                dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"] if self.mesh else 1
                if self._tok_sharding is not None and tokens.shape[0] % dp == 0:
                    tokens = jax.device_put(tokens, self._tok_sharding)
                self._ahead.append(self._serial(self._capture(tokens)))

    def _refill(self) -> None:
        self._batches = None  # the served fill's memory is free for the next one
        self._read_ahead(self.n_batches_in_buffer)  # what the read-ahead has not done yet
        acts, self._ahead = self._ahead, []
        self._fill_start = self._ahead_start
        with use_mesh(self.mesh, SAE_RULES):
            key = jax.random.fold_in(self._key, self._fill)
            self._batches = self._serial(_shuffle(acts, key, self.batch))
            if self._out_sharding is not None:
                self._batches = jax.device_put(self._batches, self._out_sharding)
        self._fill += 1
        self._served = 0

    def _serial(self, x: jax.Array) -> jax.Array:
        """x, computed. Over several CPU devices each program's collectives meet in XLA's
        in-process rendezvous, one thread per device; programs with no data dependency between
        them (the fill's forwards) run at once, and their threads can fill the pool while each
        waits for the others' missing participant: a deadlock (seen in the demo's SAE runs, "7 of
        8 arrived"). So on CPU, one such program at a time. GPUs and TPUs order them per device."""
        if self.one_program_at_a_time:
            jax.block_until_ready(x)
        return x

    def get_state(self) -> dict:
        """JSON-serialisable: resume with `set_state` to get exactly the batches that follow."""
        if self.refill_due:
            start = self._ahead_start if self._ahead else self._loader.get_state()
            return {"loader": start, "fill": self._fill, "served": 0}
        return {"loader": self._fill_start, "fill": self._fill - 1, "served": self._served}

    def set_state(self, state: dict) -> None:
        self._loader.set_state(state["loader"])
        self._fill, self._batches, self._served, self._ahead = state["fill"], None, 0, []
        if state["served"]:
            self._refill()
            self._served = state["served"]


@jax.jit
def _row_norms(x_nf: jax.Array) -> jax.Array:
    return jnp.linalg.norm(x_nf, axis=-1)  # [..., N]


def estimate_norm_scaling_factor(store: ActivationStore, n_batches: int) -> float | list[float]:
    """SAELens `ActivationScaler.estimate_scaling_factor`: sqrt(F) / mean row norm over n batches;
    a stacked store gives one factor per layer (what a store of that layer alone would give:
    each batch's norms are summed exactly, in any layout).

    Like SAELens, the batches it reads are consumed from the store, not given back.
    """
    total, count = np.zeros(len(store.layers)), 0
    for _ in range(n_batches):
        norms_ln = np.asarray(_row_norms(next(store))).reshape(len(store.layers), -1)
        total += [math.fsum(n) for n in norms_ln]
        count += norms_ln.shape[1]
    factors = [store.d_in**0.5 / (t / count) for t in total.tolist()]
    return factors if store.stacked else factors[0]
