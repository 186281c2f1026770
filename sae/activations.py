"""An activation store: MLP activations of a jaxlm model over prepared data, shuffled, in batches.

The SAELens idea (`sae_lens/training/activations_store.py`, `mixing_buffer.py`): run the model on
`n_batches_in_buffer` batches of `store_batch_size_prompts` contexts, pool their token activations
[M, F] in a buffer, shuffle it, and serve it as SAE batches of `train_batch_size_tokens` rows.

Rows of a DATADIR are seq_len + 1 tokens; the first seq_len are cut into seq_len // context_size
contexts of `context_size` tokens (a tail shorter than that is dropped), and each context is run
through a jit'd `model(tokens, capture_mlp=(layer,), capture_only=True)`, which stops after that
layer. One difference from SAELens: each buffer is shuffled and served whole (SAELens keeps half
for mixing with the next fill). That makes the store's state small and exact: the loader's state at
the start of the current fill, the fill's number and how many batches of it were served. Resuming
re-runs that fill (the same rows, the same permutation from `fold_in(seed, fill)`) and skips the
served batches, so a resumed run sees bitwise the batches an uninterrupted one would (on CPU).
"""

from __future__ import annotations

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


def capture_fn(model: GPTNeo, layer: int):
    """A jit'd (params, tokens [B, T]) -> float32 MLP hidden [B * T, F] of `layer`."""
    graphdef, params = nnx.split(model, nnx.Param)
    if not 0 <= layer < model.cfg.n_layers:
        raise UserError(f"model.layer={layer}: the model has layers 0..{model.cfg.n_layers - 1}")

    @jax.jit
    def run(params, tokens_bt):
        h_btf = nnx.merge(graphdef, params)(tokens_bt, capture_mlp=(layer,), capture_only=True)
        h_btf = h_btf[layer]
        return h_btf.reshape(-1, h_btf.shape[-1]).astype(jnp.float32)  # [B * T, F]

    return partial(run, params)


@partial(jax.jit, static_argnums=(2,))
def _shuffle(buffer_mf: jax.Array, key: jax.Array, batch: int) -> jax.Array:
    """The buffer permuted and cut into whole batches: [M // batch, batch, F]."""
    m = buffer_mf.shape[0] // batch * batch
    perm = jax.random.permutation(key, buffer_mf.shape[0])[:m]
    return buffer_mf[perm].reshape(-1, batch, buffer_mf.shape[-1])


@partial(jax.jit, static_argnums=(2,))
def _take(batches_kbf: jax.Array, i: jax.Array, sharding) -> jax.Array:
    """Batch i of a fill, each device slicing its own rows: no collective. (Eager `batches[i]`
    compiled a gather with an all-gather; on fake CPU devices it could run beside the SAE step's
    collectives and deadlock XLA's in-process rendezvous.)"""
    out = jax.lax.dynamic_index_in_dim(batches_kbf, i, 0, keepdims=False)
    return out if sharding is None else jax.lax.with_sharding_constraint(out, sharding)


class ActivationStore:
    """Iterator of float32 [train_batch_size_tokens, F] activation batches; `get_state`/`set_state`.

    `sources` are (DATADIR, weight) pairs mixed as `jaxlm.data.pipeline.make_loader` mixes them;
    `mesh` shards the model's forward (batch over the data axes) and the served batches (rows over
    `data`); without one everything runs on the default device.
    """

    def __init__(
        self,
        model: GPTNeo,
        layer: int,
        sources: Sequence[tuple[str, float]],
        *,
        context_size: int | None = None,
        store_batch_size_prompts: int = 32,
        n_batches_in_buffer: int = 20,
        train_batch_size_tokens: int = 4096,
        seed: int = 42,
        worker_count: int = 0,
        mesh: Mesh | None = None,
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
        self.layer, self.batch = layer, train_batch_size_tokens
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
        self._capture = capture_fn(model, layer)
        self._tok_sharding = batch_sharding(mesh, 2) if mesh is not None else None

        def rows_sharded(axes):  # a fill [K, batch, F] and one batch [batch, F]: rows over devices
            return None if mesh is None else NamedSharding(mesh, logical_to_pspec(axes, SAE_RULES))

        self._out_sharding = rows_sharded((None, "sae_rows", None))
        self._row_sharding = rows_sharded(("sae_rows", None))
        # several CPU devices: one program with collectives in flight at a time (see `_serial`)
        self.one_program_at_a_time = (
            mesh is not None and mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"
        )
        self._fill = 0  # number of the next fill
        self._fill_start: dict | None = None  # loader state where the current fill began
        self._batches: jax.Array | None = None  # [K, batch, F] the current fill, shuffled
        self._served = 0

    def __iter__(self) -> Iterator[jax.Array]:
        return self

    @property
    def refill_due(self) -> bool:
        """The next batch starts a new fill (model forwards, a shuffle across devices)."""
        return self._batches is None or self._served >= self._batches.shape[0]

    @property
    def serial_fill_due(self) -> bool:
        """The next batch starts a fill whose programs must run alone (see `_serial`): a caller
        with its own collective programs in flight lets them finish first."""
        return self.one_program_at_a_time and self.refill_due

    def __next__(self) -> jax.Array:
        if self.refill_due:
            self._refill()
        out = _take(self._batches, jnp.int32(self._served), self._row_sharding)
        self._served += 1
        return out

    def _tokens(self) -> np.ndarray:
        rows = next(self._loader)["tokens"][:, :-1]  # [R, seq_len]: the LM's input positions
        n = rows.shape[1] // self.context_size * self.context_size
        return rows[:, :n].reshape(-1, self.context_size)  # [R * per_row, context_size]

    def _refill(self) -> None:
        self._fill_start = self._loader.get_state()
        with use_mesh(self.mesh, SAE_RULES):
            acts = []
            for _ in range(self.n_batches_in_buffer):
                tokens = self._tokens()
                dp = self.mesh.shape["data"] * self.mesh.shape["fsdp"] if self.mesh else 1
                if self._tok_sharding is not None and tokens.shape[0] % dp == 0:
                    tokens = jax.device_put(tokens, self._tok_sharding)
                acts.append(self._serial(self._capture(tokens)))
            buffer_mf = self._serial(jnp.concatenate(acts))  # [M, F]
            key = jax.random.fold_in(self._key, self._fill)
            self._batches = self._serial(_shuffle(buffer_mf, key, self.batch))
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
            return {"loader": self._loader.get_state(), "fill": self._fill, "served": 0}
        return {"loader": self._fill_start, "fill": self._fill - 1, "served": self._served}

    def set_state(self, state: dict) -> None:
        self._loader.set_state(state["loader"])
        self._fill, self._batches, self._served = state["fill"], None, 0
        if state["served"]:
            self._refill()
            self._served = state["served"]


def estimate_norm_scaling_factor(store: ActivationStore, n_batches: int) -> float:
    """SAELens `ActivationScaler.estimate_scaling_factor`: sqrt(F) / mean row norm over n batches.

    Like SAELens, the batches it reads are consumed from the store, not given back.
    """
    total, count = 0.0, 0
    for _ in range(n_batches):
        norms = jnp.linalg.norm(next(store), axis=-1)
        total += float(norms.sum())
        count += norms.size
    return store.d_in**0.5 / (total / count)
