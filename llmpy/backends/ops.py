"""The declared op set: what a model may ask of a backend. `CPUBackend` (NumPy, the reference) and `CUDABackend`
(our kernels, cuBLASLt, cuDNN) implement every method here with these signatures (tests/test_backend_ops.py checks
it); model files call nothing else.

Conventions, as in llm.c and layers/: outputs first, then inputs, then sizes. Parameter gradients ACCUMULATE (+=);
the gradient flowing into the residual stream accumulates too; other input gradients are overwritten. Shapes: B
batch, T time, C channels, NH heads, hs head size, OC out channels, N = B*T rows, V vocabulary, Vl logit columns.
Arrays are the backend's own (NumPy or CuPy), contiguous unless a docstring says otherwise. Planning ops take
explicit sizes, never a model family's config: a backend knows ops, not models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable


@dataclass(frozen=True)
class OpShapes:
    """The sizes a model will run its ops at, so that a backend can allocate its scratch memory once."""
    B: int
    T: int
    channels: int                           # C: the residual stream (norms, embeddings)
    heads: int                              # NH: query heads (0: the model has no attention)
    kv_heads: int                           # key/value heads (== heads without grouped-query attention)
    head_size: int                          # hs
    vocab: int                              # V: token ids are < vocab
    logits: int                             # Vl: columns of the LM head product (logit_columns)
    linears: tuple[tuple[int, int], ...]    # (OC, K) of every weight a matmul op sees, the LM head's included
    bias_widths: tuple[int, ...] = ()       # OC of every matmul with a bias (its gradient is a column sum)


@dataclass(frozen=True)
class DinpSums:
    """What layernorm_backward(dinp_sums=True) returns: the column sums of its dinp, held by the backend until the
    next matmul_backward(db_sums=) takes them (the CPU: the array; the GPU: a row of partials per chunk of rows,
    `data` their count). `serial` names the call that formed them: a later dinp_sums call reuses the storage, and
    taking an older handle is an error."""
    serial: int
    C: int
    data: Any


def take_sums(h: DinpSums, serial: int, C: int) -> DinpSums:
    """h if it is the backend's live handle (serial) for C columns; else a ValueError (a model bug)."""
    if not isinstance(h, DinpSums) or h.serial != serial or h.C != C:
        raise ValueError(f"db_sums: {h!r} is not the live column sums of a {C}-wide layernorm_backward(dinp_sums=True)")
    return h


@runtime_checkable
class Backend(Protocol):
    name: str            # "cpu" | "cuda"
    xp: Any              # the array module: numpy or cupy
    dtype_name: str      # "fp32" | "bf16" | "fp64"
    act_dtype: Any       # activations and their gradients
    param_dtype: Any     # the compute copy of the weights and their gradients
    stat_dtype: Any      # normalisation statistics, per-token losses, attention statistics
    acc_dtype: Any       # loss sums, gradient norms
    capturing: bool      # a CUDA graph is being recorded: nothing runs, nothing may be read back
    stream: Any          # the stream every op runs on (in-order stand-in on the CPU)
    fp8_fused: bool      # --dtype fp8 (the GPU's): a registered product's forward keeps FP8 copies of its input for
    #                      its backward, and a producer given fp8_next writes only those copies: such an input is
    #                      then read by nothing else, neither kept per layer nor recomputed

    # ---- memory and transfers ------------------------------------------------------------------------------
    def zeros(self, n: int, dtype) -> Any:
        """A new zeroed 1-D array of n elements (the only allocation a model makes: at planning time)."""

    def asarray(self, x, dtype=None) -> Any:
        """A new device array holding host array x (synchronous)."""

    def to_numpy(self, x) -> Any:
        """A host copy of device array x (waits for the work that writes it)."""

    def copy_(self, dst, src) -> None:
        """dst = src, same shape; src fp32 into a lower-precision dst rounds to nearest."""

    def load_f32(self, dst, src_f32) -> None:
        """dst (any dtype) = src (fp32, host or device), rounded to nearest."""

    def fill_zero(self, x) -> None:
        """x = 0 (contiguous)."""

    def release_cache(self) -> None:
        """Hands scratch memory no array holds any more back to the device (a GPU's pool would keep it, counted
        in the process's peak memory)."""

    def add_inplace(self, a, b) -> None:
        """a += b, elementwise, same size."""

    def fresh_grads(self, flat) -> None:
        """The parameter gradients in flat count as zero from here (a training step's first micro-batch), without
        a memset: the first op that writes each gradient overwrites it (backends/fresh.py)."""

    def settle_grads(self, x=None) -> None:
        """Every gradient in x (default: all) that still counts as zero but was never written is zeroed now."""

    def set_tokens(self, dst, host, *, training: bool = True) -> None:
        """dst (B, T) int32 = host token ids, asynchronously; training: also what encoder_backward needs."""

    def upload(self, dst, host) -> None:
        """dst (contiguous) = host array, asynchronously (host may be reused at once)."""

    def async_read(self, *arrays) -> Any:
        """Starts copies of small device arrays to the host; `.result()` waits for them alone, returns a list."""

    def synchronize(self) -> None:
        """Waits until every op issued so far has run."""

    # ---- streams and graphs --------------------------------------------------------------------------------
    def capture(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Records fn's ops (nothing runs now); returns a function that replays them."""

    def side_stream(self) -> Any:
        """A second stream (communication overlapping backward)."""

    def event(self) -> Any:
        """An event: `record(stream)`, and `stream.wait_event(event)` orders two streams."""

    def on(self, stream) -> Any:
        """Context manager: the ops inside run on `stream`; the backend's stream is current again after."""

    # ---- planning (explicit sizes) -------------------------------------------------------------------------
    def logit_columns(self, vocab_size: int, padded_vocab_size: int) -> int:
        """Vl: columns of the logits this backend forms (V on the CPU; the padded Vp on the GPU, which tiles
        better; padded columns never get probability)."""

    def attention_state(self, B: int, T: int, heads: int, kv_heads: int, head_size: int) -> tuple[tuple, str]:
        """(shape, kind) of the per-layer tensor attention_forward saves for backward: "act" (activation dtype,
        the softmax (B, NH, T, T)) or "stat" (stat dtype, e.g. softmax statistics (B, NH, T))."""

    def plan_workspace(self, shapes: OpShapes) -> int:
        """Allocates the scratch every op needs at these sizes, once; returns its size in bytes."""

    # ---- layers --------------------------------------------------------------------------------------------
    def encoder_forward(self, out, tokens, wte, wpe) -> None:
        """out (B, T, C) = wte[tokens] + wpe[:T]; tokens (B, T) int32, wte (Vp, C), wpe (>= T, C) or None (no
        position table: out = wte[tokens]). wte in the parameter dtype, or bf16 (a packed model's embedding)."""

    def encoder_backward(self, dwte, dwpe, dout, tokens) -> None:
        """dwte (Vp, C) += scatter of dout (B, T, C) by tokens; dwpe (maxT, C)[:T] += sum over B of dout (None: no
        position table)."""

    def layernorm_forward(self, out, mean, rstd, inp, w, b, fp8_next=None) -> None:
        """out (N, C) = (inp - mean) * rstd * w + b; mean, rstd (N,) saved (stat dtype); inp (..., C). fp8_next:
        as matmul_forward's (the registered product that reads out next)."""

    def fused_residual_layernorm_forward(self, residual, out, mean, rstd, inp1, inp2, w, b, fp8_next=None) -> None:
        """residual (N, C) = inp1 + inp2; then layernorm_forward(out, mean, rstd, residual, w, b, fp8_next)."""

    def layernorm_backward(self, dinp, dw, db, dout, inp, w, mean, rstd, dinp_sums=False):
        """dinp (N, C) +=, dw, db (C,) += the LayerNorm's gradients given dout (N, C) and the saved stats. With
        dinp_sums: also the column sums of the updated dinp, returned as a handle for the next
        matmul_backward(db_sums=) (dinp is then the residual stream's gradient, and its sums the bias gradient of
        the product that wrote that stream); on a GPU formed in the same pass over the rows. One handle is live at
        a time: the next dinp_sums call replaces it."""

    def matmul_forward(self, out, inp, w, b, gelu_pre=None, fp8_next=None) -> None:
        """out (N, OC) = inp (N, K) @ w (OC, K).T + b (OC,) or no bias (b None). With gelu_pre (N, OC): that
        product is saved there and out = gelu(gelu_pre) (tanh GELU). A w registered with fp8_register: the product
        runs on FP8 operands (layers/fp8.py), here and in matmul_backward, whose inp must then be the tensor this
        forward read (the GPU keeps its FP8 copy for the weight gradient). fp8_next: the registered weight of the
        product that reads out next (with gelu_pre): a GPU may write out only as that product's FP8 copies, so out
        is then read by nothing but that product's forward and backward."""

    def matmul_backward(self, dinp, dw, db, dout, inp, w, gelu_pre=None, gelu_db=None, gelu_redo=False,
                        db_sums=None) -> None:
        """dinp (N, K) = dout (N, OC) @ w (None: not formed); dw (OC, K) += dout.T @ inp (None: not formed, inp
        unused); db (OC,) += column sums of dout (None: no bias). With gelu_pre: dinp *= gelu'(gelu_pre), the GELU
        backward of the layer below (gelu_pre then has dinp's shape); with gelu_db (K,) as well: gelu_db += the
        column sums of that dinp, the bias gradient of the product below (whose own backward then passes
        db=None): the same sums, formed while dinp is in hand (one read of it fewer on a GPU). gelu_redo: inp =
        gelu(gelu_pre) is not formed yet (recompute): it is written before dw needs it (on a GPU by the GELU
        backward's kernel, from the gelu_pre it reads anyway). db_sums: the handle that
        layernorm_backward(dinp_sums=True) returned over this dout: db takes those sums instead of summing dout."""

    def gelu_forward(self, out, inp) -> None:
        """out = gelu(inp) (tanh form), any shape."""

    def rmsnorm_forward(self, out, rstd, inp, w, eps: float, fp8_next=None) -> None:
        """out (N, C) = inp * rstd * w, rstd (N,) = 1/sqrt(mean(inp^2) + eps) saved (stat dtype); inp (..., C).
        fp8_next: as matmul_forward's (the registered product that reads out next)."""

    def fused_residual_rmsnorm_forward(self, residual, out, rstd, inp1, inp2, w, eps: float, fp8_next=None) -> None:
        """residual (N, C) = inp1 + inp2; then rmsnorm_forward(out, rstd, residual, w, eps, fp8_next)."""

    def rmsnorm_backward(self, dinp, dw, dout, inp, w, rstd) -> None:
        """dinp (N, C) +=, dw (C,) += the RMSNorm's gradients given dout (N, C) and the saved rstd."""

    def rope_forward(self, qkv, table, num_heads: int, kv_heads: int, pos: int = 0) -> None:
        """RoPE in place on the q and k parts of qkv (B, T, (NH + 2K) hs) at positions pos..pos+T-1, Meta's
        pairing (x[2i], x[2i+1]); table (maxT, hs/2, 2) fp32 cos, sin (layers/rope.py rope_table)."""

    def rope_backward(self, dqkv, table, num_heads: int, kv_heads: int) -> None:
        """The transposed rotation, in place on dqkv's q and k parts (positions 0..T-1)."""

    def swiglu_forward(self, out, inp, fp8_next=None) -> None:
        """out (N, F) = up * silu(gate), inp (N, 2F) = [up | gate]. fp8_next: as matmul_forward's."""

    def swiglu_backward(self, dinp, inp, dout, redo=None, fp8_next=None) -> None:
        """dinp (N, 2F) = the gradient of swiglu_forward at inp given dout (N, F) (overwritten). redo (N, F): also
        receives swiglu_forward(inp) (recompute; on a GPU from the inp this kernel reads anyway). fp8_next: the
        registered weight of the product whose matmul_backward takes dinp as its dout next (with no bias): a GPU
        may write dinp only as that product's FP8 copies (without redo)."""

    def bitlinear_forward(self, out, rstd, inp, w, gamma, eps: float, w_rows: int | None = None) -> None:
        """The MatMul-free LM's ternary linear layer (layers/bitlinear.py): out (N, OC) from inp (N, K), w (OC, K),
        the inner RMSNorm's gain gamma (K,): per-row int8 activations (absmax to 127, round half away from zero),
        ternary weights (per-matrix absmean scale, round half to even), an exact integer product, one rescale per
        output; rstd (N,) saved (stat dtype). w is used only through q_w and s_w: it may be the fp32 master copy of
        a lower-precision model. w_rows: the leading rows of w its scale averages over (an LM head's vocabulary
        padding rows are zero and left out; None: all OC)."""

    def bitlinear_backward(self, dinp, dw, dgamma, dout, inp, w, gamma, rstd, w_rows: int | None = None) -> None:
        """The straight-through backward: dinp (N, K) +=, dw (OC, K) +=, dgamma (K,) += given dout (N, OC)."""

    def bitlinear_packed_forward(self, out, rstd, inp, codes, scale: float, K: int, packing: str, gamma,
                                 eps: float) -> None:
        """bitlinear_forward from packed ternary weights (formats/ternary.py): codes uint8 (OC, ceil(K / per
        byte)), scale s_w; the same result as the latent weights they were packed from (inference only)."""

    def bitlinear_packed_forward3(self, outs, rstd, inp, codes, scales, K: int, packing: str, gammas,
                                  eps: float) -> None:
        """Three bitlinear_packed_forwards of one input (the MLGRU's i, f, g: one rstd, three codes, scales, gammas
        and outs); the GPU runs them as one launch when decoding."""

    def bitlinear_packed_swiglu_forward(self, out, rstd, inp, codes, scale: float, K: int, packing: str, gamma,
                                        eps: float) -> None:
        """A GLU's packed gate/up projection and its SwiGLU: out (N, F) = swiglu of bitlinear_packed_forward's
        (N, 2F) = [up | gate] (codes of 2F rows); the GPU does both in its decode kernel."""

    def mlgru_forward(self, o, h, rstd, ai, af, ag, lam, gamma, h0, eps: float) -> None:
        """MLGRU (layers/mlgru.py): o (B, T, d) from the projections ai, af, ag (B, T, d), the layer's lower bound
        lam (d,) and the gate norm's gain gamma (d,); h (B, T, d) every recurrent state and rstd (B, T) saved (stat
        dtype); h0 (B, d) the state before the first position (stat dtype) or None for zeros."""

    def mlgru_backward(self, dai, daf, dag, dlam, dgamma, do, ai, af, ag, lam, gamma, h, rstd) -> None:
        """dai, daf, dag (B, T, d) overwritten; dlam (d,) +=, dgamma (d,) += (fp32 for dlam); given do (B, T, d)."""

    def lower_bounds_forward(self, lam, P) -> None:
        """lam (L, d) = cumsum(softmax(P over layers)) - softmax(P)_0, P (L, d) (lam fp32)."""

    def lower_bounds_backward(self, dP, dlam, P) -> None:
        """dP (L, d) += the gradient given dlam (L, d) (fp32)."""

    def attention_forward(self, out, state, qkv, num_heads: int, kv_heads: int | None = None) -> None:
        """Causal self-attention: out (B, T, C) from qkv (B, T, (NH + 2K) hs) = [q | k | v], head h on channels
        h*hs:(h+1)*hs of its part, query head h reading key/value head h // (NH/K) (kv_heads None: K = NH);
        state (attention_state's shape) saved for backward."""

    def attention_backward(self, dqkv, dout, qkv, state, num_heads: int, out=None,
                           kv_heads: int | None = None) -> None:
        """dqkv (B, T, (NH + 2K) hs) = the gradient through attention of dout (B, T, C); out: forward's output
        (cuDNN needs it)."""

    def attention_decode(self, out, qkv, k_cache, v_cache, pos: int, num_heads: int,
                         kv_heads: int | None = None) -> None:
        """One new position per sequence with a KV cache (inference): qkv (B, 1, (NH + 2K) hs) holds the new
        token's q, k, v; k and v go into k_cache, v_cache (B, K, maxT, hs) at `pos`; out (B, 1, C) = the attention
        of q over positions 0..pos."""

    def kv_cache_write(self, k_cache, v_cache, qkv, pos: int, num_heads: int, kv_heads: int | None = None) -> None:
        """The keys and values of n positions (a decoding prefill) into the caches: qkv (B, n, (NH + 2K) hs) = [q |
        k | v], a view of the first n positions of a larger tensor (strided when B > 1); k_cache, v_cache (B, K,
        capacity, hs) at positions pos..pos+n-1."""

    def fused_classifier(self, losses, logits, targets, vocab_size: int, dloss=None, fp8_next=None) -> None:
        """losses (N,) = cross-entropy of logits (N, Vl)[:, :vocab_size] against targets (N,); with dloss (the
        gradient of the total loss w.r.t. each row's loss) logits becomes dlogits in place (padded columns 0).
        fp8_next: the LM head's weight, whose matmul_backward takes dlogits next; where it is a registered FP8
        product its output-gradient scale is set from dloss (layers/fp8.py), and on a GPU with the fused copies
        dlogits are written only as that product's FP8 copies (as swiglu_backward's fp8_next)."""

    def loss_accumulate(self, acc, losses, scale: float) -> None:
        """acc[0] += scale * sum(losses), on the device (no read back)."""

    def mean_loss(self, losses) -> float:
        """The mean of losses (N,), read back to the host."""

    # ---- FP8 products (--dtype fp8: layers/fp8.py the recipe, backends/fp8.py the bookkeeping) -----------------
    def fp8_register(self, weights, rows: int, head=None, head_rows: int = 0) -> int:
        """Plans FP8 products for these weights (the (OC, K) views of a model's block products, one per product)
        run on `rows` (B*T) rows, and for the LM head's weight `head` (Vl, C) (may be None) run on at most
        head_rows rows (a chunk): their scale state (`self.fp8`: hist, pending, scale, overflows), FP8 weight copies
        and scratch; returns the bytes. Only on a backend made for --dtype fp8 (its `fp8_enabled`)."""

    def fp8_begin_step(self) -> None:
        """Before a training step's first micro-batch: the step's activation and gradient amax and the clamp count
        start at zero (the first step of a fresh run scales each operand by its own amax)."""

    def fp8_end_step(self) -> None:
        """After AdamW: the step's amax into each operand's history, new scales, the new weights quantized."""

    def fp8_quantize_weights(self) -> None:
        """The registered weights' FP8 copies from the current weights (after loading them)."""

    def fp8_state(self) -> dict:
        """The scale state as host arrays: fp8_amax_history (P, 3, H), fp8_scale (P, 3) (a checkpoint's)."""

    def fp8_load_state(self, state: dict) -> None:
        """Restores fp8_state's arrays and quantizes the weights with them (a resume)."""

    # ---- optimizer -----------------------------------------------------------------------------------------
    def grad_sumsq(self, out, flat) -> None:
        """out[0] = sum of squares of flat, in a fixed order (deterministic)."""

    def norm_from_sumsq(self, out, sumsq, guard) -> None:
        """out[0] = sqrt(sumsq[0]), or NaN when guard[0] (the step's loss) is not finite."""

    def adamw(self, p, master, g, m, v, hp, norm, weight_decay: float, offset: int) -> None:
        """One AdamW step over one flat run of parameters, in place. p: compute weights; master: fp32 master
        weights (None: update p directly, with stochastic rounding below fp32); g: gradients; m, v: fp32 moments;
        hp (8,) = [lr, beta1, beta2, eps, 1/(1-beta1^t), 1/(1-beta2^t), grad_clip, seed]; norm[0] the global
        gradient norm (clips when above grad_clip; non-finite: no update); offset: p's position in the whole
        parameter buffer (seeds the rounding)."""
