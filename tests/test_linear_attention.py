"""Single-device linear attention: chunked kernel vs per-token and quadratic references (fp64)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from parallel.linear_attention import (
    _quadratic_attention,
    chunk_linear_attention,
    first_segment_decay,
    last_segment_state,
    linear_attention,
    linear_attention_recurrent,
    segment_ids,
    validate_linear_attention_inputs,
)

# fp64 chunked vs fp64 reference: both are exact up to rounding (observed ~1e-15); 1e-10 leaves
# room for accumulation over T and exp, yet any maths slip (a missing term) is far above it.
TOL_FP64 = 1e-10
# fp32 kernel vs fp64 reference: fp32 rounding (~6e-8) grown by sums over T and chunk products.
TOL_FP32 = 1e-5
TINY = 1e-300
# fp32 with steep decays (-50 per token): the kernel's weights are exp(b_i - b_j) of chunk-local cumsums,
# |b| up to chunk * 52 = 420 whose fp32 ulp (3e-5) is an absolute error in the exponent, i.e. a relative one
# in the weight (observed 2e-5 on da); the same holds for any cumsum-difference kernel (fla's included).
TOL_FP32_STEEP = 1e-4
# Where the exact value is 0 (e.g. da at T=1 without h0, or every decay underflowing to 0), gradient paths
# that cancel (+g and -g on one cumulative log-decay) leave rounding residue of O(1..10)-sized values.
ATOL_ZERO = {torch.float64: 1e-12, torch.float32: 1e-5}

H, DK, DV = 2, 6, 5
DECAYS = ["none", "head", "token"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / max(float(b.norm()), TINY))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    B: int
    T: int
    cu: tuple[int, ...] | None
    chunk: int


CASES = [
    Case("B2-T37-c8", 2, 37, None, 8),
    # boundaries at chunk edges 8 and 16, a one-token document [8, 9), a ragged last chunk
    Case("docs-T37-c8", 1, 37, (0, 8, 9, 16, 30, 37), 8),
    Case("docs-T37-c1", 1, 37, (0, 8, 9, 16, 30, 37), 1),
    Case("docs-T37-c64", 1, 37, (0, 8, 9, 16, 30, 37), 64),
    # one-token documents at the start, just before a chunk edge and at the very end
    Case("docs-T40-c8", 1, 40, (0, 1, 7, 8, 24, 25, 39, 40), 8),
    Case("docs-T3-c2", 1, 3, (0, 1, 3), 2),
    Case("T1-c8", 1, 1, (0, 1), 8),
    Case("B2-T1", 2, 1, None, 8),
]


def make_inputs(B, T, decay, *, dtype=torch.float64, seed=0, h0=False, decay_scale=1.0):
    torch.manual_seed(seed)
    q = torch.randn(B, T, H, DK, dtype=dtype)
    k = torch.randn(B, T, H, DK, dtype=dtype)
    v = torch.randn(B, T, H, DV, dtype=dtype)
    if decay == "none":
        a = None
    elif decay == "head":
        a = -(0.05 + torch.rand(H, dtype=dtype)) * decay_scale
    else:
        a = -(0.05 + torch.rand(B, T, H, dtype=dtype)) * decay_scale
    s = torch.randn(B, H, DK, DV, dtype=dtype) if h0 else None
    return q, k, v, a, s


def cu_tensor(cu):
    return None if cu is None else torch.tensor(cu, dtype=torch.int32)


def outputs_and_grads(fn, q, k, v, a, h0, *, seed=1):
    """Run fn on fresh leaves (the non-None inputs, passed by name); return (outputs, grads by name).

    Every output gets a random upstream gradient (drawn in fp64 so that fp32 and fp64 runs see the same one).
    """
    named = (("q", q), ("k", k), ("v", v), ("a", a), ("h0", h0))
    leaves = {n: t.detach().clone().requires_grad_() for n, t in named if t is not None}
    outs = [o for o in fn(**leaves) if o is not None]
    torch.manual_seed(seed)
    # torch.randn(shape), not randn_like: randn_like follows the strides, which differ between implementations.
    loss = sum((o * torch.randn(o.shape, dtype=torch.float64).to(o.dtype)).sum() for o in outs)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return outs, dict(zip(leaves, grads))


def abs_max(t: torch.Tensor) -> float:
    return float(t.detach().abs().max()) if t.numel() else 0.0


def check(got, want, tol, what):
    """rel_err(got, want) <= tol; where the reference is exactly 0 (da at T=1 without h0), |got| <= ATOL_ZERO."""
    assert torch.isfinite(got).all(), f"{what} not finite"
    if abs_max(want) == 0.0:
        assert abs_max(got) <= ATOL_ZERO[got.dtype], f"{what}: reference is 0, got max |.| {abs_max(got):.3e}"
        return
    err = rel_err(got, want)
    assert err <= tol, f"{what}: rel err {err:.3e} > {tol}"


def assert_all_close(got, want, tol, what=""):
    (outs_g, grads_g), (outs_w, grads_w) = got, want
    assert len(outs_g) == len(outs_w)
    for i, (x, y) in enumerate(zip(outs_g, outs_w)):
        check(x, y, tol, f"{what} output {i}")
    assert grads_g.keys() == grads_w.keys()
    for name in grads_w:
        check(grads_g[name], grads_w[name], tol, f"{what} d{name}")


def chunk_fn(causal, cu, chunk):
    def fn(q, k, v, a=None, h0=None):
        return chunk_linear_attention(
            q,
            k,
            v,
            causal=causal,
            log_decay=a,
            cu_seqlens=cu,
            initial_state=h0,
            output_final_state=causal,
            chunk_size=chunk,
        )

    return fn


def recurrent_fn(causal, cu):
    def fn(q, k, v, a=None, h0=None):
        return linear_attention_recurrent(q, k, v, causal=causal, log_decay=a, cu_seqlens=cu, initial_state=h0)

    return fn


# ----------------------------------------------------------------------------- kernel vs reference


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("mode", ["causal", "causal-h0", "bidir"])
def test_chunked_matches_recurrent(mode, decay, case):
    causal = mode != "bidir"
    q, k, v, a, h0 = make_inputs(case.B, case.T, decay, h0=mode == "causal-h0")
    cu = cu_tensor(case.cu)
    got = outputs_and_grads(chunk_fn(causal, cu, case.chunk), q, k, v, a, h0)
    want = outputs_and_grads(recurrent_fn(causal, cu), q, k, v, a, h0)
    assert len(got[0]) == (2 if causal else 1)
    assert_all_close(got, want, TOL_FP64, mode)


@pytest.mark.parametrize("case", [c for c in CASES if c.T > 1], ids=lambda c: c.name)
@pytest.mark.parametrize("decay", DECAYS)
def test_quadratic_matches_recurrent_causal(decay, case):
    """The two references cross-check each other on the causal form."""
    q, k, v, a, _ = make_inputs(case.B, case.T, decay)
    cu = cu_tensor(case.cu)

    def quad(q, k, v, a=None):
        return (_quadratic_attention(q, k, v, causal=True, log_decay=a, cu_seqlens=cu),)

    def rec(q, k, v, a=None):
        return (linear_attention_recurrent(q, k, v, log_decay=a, cu_seqlens=cu)[0],)

    assert_all_close(outputs_and_grads(quad, q, k, v, a, None), outputs_and_grads(rec, q, k, v, a, None), TOL_FP64)


@pytest.mark.parametrize("cu", [None, (0, 2, 3, 6)], ids=["one-doc", "docs"])
def test_bidirectional_reference_matches_definition(cu):
    """Brute force over (i, j) with the weight prod_{m in (min, max]} exp(a_m), inside documents."""
    T = 6
    q, k, v, a, _ = make_inputs(1, T, "token")
    seg = segment_ids(cu_tensor(cu), T).tolist()
    want = torch.zeros(1, T, H, DV, dtype=torch.float64)
    for i in range(T):
        for j in range(T):
            if seg[i] != seg[j]:
                continue
            lo, hi = min(i, j), max(i, j)
            w = torch.exp(a[0, lo + 1 : hi + 1].sum(0))  # [H]
            want[0, i] += (w * (q[0, i] * k[0, j]).sum(-1))[:, None] * v[0, j]
    got, _ = linear_attention_recurrent(q, k, v, causal=False, log_decay=a, cu_seqlens=cu_tensor(cu))
    assert rel_err(got, want) <= TOL_FP64
    got_chunk = linear_attention(q, k, v, causal=False, log_decay=a, cu_seqlens=cu_tensor(cu))
    assert rel_err(got_chunk, want) <= TOL_FP64


def test_bidirectional_no_decay_is_global_state():
    q, k, v, _, _ = make_inputs(2, 11, "none")
    want = torch.einsum("bthk,bhkv->bthv", q, torch.einsum("bthk,bthv->bhkv", k, v))
    assert rel_err(linear_attention(q, k, v, causal=False), want) <= TOL_FP64


# ----------------------------------------------------------------------------- rank-level identities

DOC_LAYOUTS = {
    "one-doc": None,
    "docs": (0, 8, 9, 16, 30, 37),
    "docs-last-len1": (0, 20, 36, 37),
}


@pytest.mark.parametrize("layout", DOC_LAYOUTS)
@pytest.mark.parametrize("decay", DECAYS)
def test_final_state_is_gamma_h0_plus_E(decay, layout):
    cu = cu_tensor(DOC_LAYOUTS[layout])
    q, k, v, a, h0 = make_inputs(1, 37, decay, h0=True)

    def kernel(q, k, v, h0, a=None):
        return (
            chunk_linear_attention(
                q, k, v, log_decay=a, cu_seqlens=cu, initial_state=h0, output_final_state=True, chunk_size=8
            )[1],
        )

    def composed(q, k, v, h0, a=None):
        E, log_gamma = last_segment_state(k, v, log_decay=a, cu_seqlens=cu)
        assert E.shape == (1, H, DK, DV) and log_gamma.shape == (1, H)
        return (torch.exp(log_gamma)[..., None, None] * h0 + E,)

    # q does not reach the state: compare through (k, v, a, h0) only.
    got = outputs_and_grads(lambda **kw: composed(q, **kw), None, k, v, a, h0)
    want = outputs_and_grads(lambda **kw: kernel(q, **kw), None, k, v, a, h0)
    assert_all_close(got, want, TOL_FP64)
    _, log_gamma = last_segment_state(k, v, log_decay=a, cu_seqlens=cu)
    if cu is not None:
        assert torch.isneginf(log_gamma).all()


@pytest.mark.parametrize("layout", DOC_LAYOUTS)
@pytest.mark.parametrize("decay", DECAYS)
def test_initial_state_contribution_is_first_segment_decay(decay, layout):
    cu = cu_tensor(DOC_LAYOUTS[layout])
    q, k, v, a, h0 = make_inputs(1, 37, decay, h0=True)

    def kernel(q, k, v, h0, a=None):
        with_h0 = chunk_linear_attention(q, k, v, log_decay=a, cu_seqlens=cu, initial_state=h0, chunk_size=8)[0]
        without = chunk_linear_attention(q, k, v, log_decay=a, cu_seqlens=cu, chunk_size=8)[0]
        return (with_h0 - without,)

    def composed(q, k, v, h0, a=None):
        b = first_segment_decay(a, cu, 1, 37, H, dtype=q.dtype)
        return (torch.exp(b)[..., None] * torch.einsum("bthk,bhkv->bthv", q, h0) + 0 * (k.sum() + v.sum()),)

    got = outputs_and_grads(composed, q, k, v, a, h0)
    want = outputs_and_grads(kernel, q, k, v, a, h0)
    # dk and dv are analytically zero on both sides: compare them absolutely.
    for name in ("k", "v"):
        assert want[1][name].abs().max() <= 1e-12
        got[1][name], want[1][name] = torch.zeros(1), torch.zeros(1)
    assert_all_close(got, want, TOL_FP64)
    b = first_segment_decay(a, cu, 1, 37, H)
    first_end = 37 if cu is None else int(cu[1])
    assert torch.isneginf(b[:, first_end:]).all() and torch.isfinite(b[:, :first_end]).all()


def split_cu(cu, s, e):
    """Local cu_seqlens of the span [s, e) and whether a document starts exactly at s (> 0)."""
    if cu is None:
        return None, False
    inner = [c - s for c in cu if s < c < e]
    return torch.tensor([0, *inner, e - s]), s in cu and s > 0


def chained(q, k, v, a, h0, cu, cuts, *, via_segment_state):
    """Run the spans between cuts one after another, passing the state like an SP ring would."""
    bounds = [0, *cuts, q.shape[1]]
    outs, state = [], h0
    for s, e in zip(bounds[:-1], bounds[1:]):
        local_cu, starts_doc = split_cu(cu, s, e)
        if starts_doc:
            state = torch.zeros_like(state)  # a document starts at the cut: nothing carries over
        a_local = a if a is None or a.dim() == 1 else a[:, s:e]
        o, out_state = chunk_linear_attention(
            q[:, s:e],
            k[:, s:e],
            v[:, s:e],
            log_decay=a_local,
            cu_seqlens=local_cu,
            initial_state=state,
            output_final_state=True,
            chunk_size=4,
        )
        if via_segment_state:
            E, log_gamma = last_segment_state(k[:, s:e], v[:, s:e], log_decay=a_local, cu_seqlens=local_cu)
            out_state = torch.exp(log_gamma)[..., None, None] * state + E
        outs.append(o)
        state = out_state
    return torch.cat(outs, dim=1), state


SPLITS = [
    ("one-doc-mid", None, (17,)),
    ("one-doc-3way", None, (1, 36)),
    ("cut-on-boundary", (0, 8, 9, 16, 30, 37), (16,)),
    ("cut-inside-doc", (0, 8, 9, 16, 30, 37), (20,)),
    ("cut-around-len1-doc", (0, 8, 9, 16, 30, 37), (8, 9)),
    ("4way-mixed", (0, 8, 9, 16, 30, 37), (5, 16, 33)),
]


@pytest.mark.parametrize("via_segment_state", [False, True], ids=["kernel-state", "segment-state"])
@pytest.mark.parametrize("name,cu,cuts", SPLITS, ids=[s[0] for s in SPLITS])
@pytest.mark.parametrize("decay", DECAYS)
def test_split_and_chain_reproduces_unsplit(decay, name, cu, cuts, via_segment_state):
    q, k, v, a, h0 = make_inputs(1, 37, decay, h0=True)

    def whole(q, k, v, h0, a=None):
        return chunk_linear_attention(
            q, k, v, log_decay=a, cu_seqlens=cu_tensor(cu), initial_state=h0, output_final_state=True, chunk_size=8
        )

    def split(q, k, v, h0, a=None):
        return chained(q, k, v, a, h0, cu, cuts, via_segment_state=via_segment_state)

    assert_all_close(outputs_and_grads(split, q, k, v, a, h0), outputs_and_grads(whole, q, k, v, a, h0), TOL_FP64)


# ----------------------------------------------------------------------------- numerics and dtypes


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("decay,scale", [("token", 50.0), ("head", 1e4)], ids=["token-50", "head-1e4"])
@pytest.mark.parametrize("mode", ["causal-h0", "bidir"])
@pytest.mark.parametrize("cu", [None, (0, 8, 9, 16, 30, 37)], ids=["one-doc", "docs"])
def test_very_negative_decays_are_finite(mode, decay, scale, dtype, cu):
    causal = mode != "bidir"
    q, k, v, a, h0 = make_inputs(1, 37, decay, h0=causal, decay_scale=scale, dtype=dtype)
    cu = cu_tensor(cu)
    got = outputs_and_grads(chunk_fn(causal, cu, 8), q, k, v, a, h0)
    for t in [*got[0], *got[1].values()]:
        assert torch.isfinite(t).all()
    up = [None if t is None else t.double() for t in (q, k, v, a, h0)]
    want = outputs_and_grads(recurrent_fn(causal, cu), *up)
    assert_all_close(got, want, TOL_FP64 if dtype == torch.float64 else TOL_FP32_STEEP)
    # The rank-level pieces too.
    E, log_gamma = last_segment_state(k, v, log_decay=a, cu_seqlens=cu)
    assert torch.isfinite(E).all() and not torch.isnan(log_gamma).any()
    assert not torch.isnan(first_segment_decay(a, cu, 1, 37, H)).any()


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("mode", ["causal-h0", "bidir"])
def test_fp32_matches_fp64_reference(mode, decay):
    causal = mode != "bidir"
    cu = cu_tensor((0, 8, 9, 16, 30, 37))
    q, k, v, a, h0 = make_inputs(1, 37, decay, h0=causal, dtype=torch.float32)
    got = outputs_and_grads(chunk_fn(causal, cu, 8), q, k, v, a, h0)
    assert got[0][0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in got[1].values())
    if causal:
        assert got[0][1].dtype == torch.float32
    up = [None if t is None else t.double() for t in (q, k, v, a, h0)]
    assert_all_close(got, outputs_and_grads(recurrent_fn(causal, cu), *up), TOL_FP32)


def test_low_precision_inputs_compute_in_fp32():
    q, k, v, a, _ = make_inputs(1, 20, "token", dtype=torch.bfloat16)
    o, state = chunk_linear_attention(q, k, v, log_decay=a, output_final_state=True, chunk_size=8)
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    want, _ = linear_attention_recurrent(q.double(), k.double(), v.double(), log_decay=a.double())
    assert rel_err(o, want) <= 1e-2  # bf16 output rounding (2^-8) only; the maths ran in fp32


def test_linear_attention_is_chunk_output():
    q, k, v, a, _ = make_inputs(1, 37, "token")
    cu = cu_tensor((0, 8, 9, 16, 30, 37))
    for causal in (True, False):
        o = linear_attention(q, k, v, causal=causal, log_decay=a, cu_seqlens=cu)
        want, _ = linear_attention_recurrent(q, k, v, causal=causal, log_decay=a, cu_seqlens=cu)
        assert o.shape == (1, 37, H, DV) and rel_err(o, want) <= TOL_FP64


def test_empty_sequence():
    q, k, v, a, h0 = make_inputs(2, 0, "token", h0=True)
    o, state = chunk_linear_attention(q, k, v, log_decay=a, initial_state=h0, output_final_state=True)
    assert o.shape == (2, 0, H, DV) and torch.equal(state, h0)
    E, log_gamma = last_segment_state(k, v, log_decay=a)
    assert torch.equal(E, torch.zeros_like(E)) and torch.equal(log_gamma, torch.zeros_like(log_gamma))
    assert linear_attention(q, k, v, causal=False).shape == (2, 0, H, DV)


def test_segment_ids():
    assert segment_ids(torch.tensor([0, 1, 4, 5]), 5).tolist() == [0, 1, 1, 1, 2]
    assert segment_ids(None, 3).tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------- validation


def _good():
    q, k, v, _, _ = make_inputs(1, 6, "none")
    return {"q": q, "k": k, "v": v, "log_decay": None, "cu_seqlens": None, "initial_state": None}


def _set(**changes):
    def mutate(kw):
        kw.update({n: f(kw) if callable(f) else f for n, f in changes.items()})
        return kw

    return mutate


BAD_INPUTS = [
    ("q-rank3", _set(q=lambda kw: kw["q"][0]), "q must be rank-4"),
    ("k-not-tensor", _set(k=[1.0]), "k must be a torch.Tensor"),
    ("v-int", _set(v=lambda kw: kw["v"].long()), "v must have a floating dtype"),
    ("k-tokens", _set(k=lambda kw: kw["k"][:, :5]), "k must have the same [batch, tokens, heads]"),
    ("v-heads", _set(v=lambda kw: torch.cat([kw["v"], kw["v"]], dim=2)), "v must have the same [batch, tokens"),
    # "meta" stands in for a second device on a CPU-only machine.
    ("v-device", _set(v=lambda kw: kw["v"].to("meta")), "v must be on the same device"),
    ("decay-device", _set(log_decay=torch.zeros(2, device="meta")), "log_decay must be on the same device"),
    ("h0-device", _set(initial_state=torch.zeros(1, 2, 6, 5, device="meta")), "initial_state must be on the same"),
    ("k-head-dim", _set(k=lambda kw: kw["k"][..., :4]), "k must have the same head dim"),
    ("v-dtype", _set(v=lambda kw: kw["v"].float()), "v must have the same dtype"),
    ("decay-shape", _set(log_decay=-torch.ones(3)), "log_decay must have shape"),
    ("decay-positive", _set(log_decay=torch.tensor([-1.0, 0.5], dtype=torch.float64)), "log_decay must be <= 0"),
    ("decay-nan", _set(log_decay=torch.tensor([-1.0, float("nan")])), "log_decay must be finite"),
    ("decay-neginf", _set(log_decay=torch.tensor([-1.0, float("-inf")])), "log_decay must be finite"),
    ("decay-int", _set(log_decay=torch.zeros(2, dtype=torch.long)), "log_decay must have a floating dtype"),
    ("cu-float", _set(cu_seqlens=torch.tensor([0.0, 6.0])), "cu_seqlens must have an integer dtype"),
    ("cu-2d", _set(cu_seqlens=torch.tensor([[0, 6]])), "cu_seqlens must be 1-D"),
    ("cu-start", _set(cu_seqlens=torch.tensor([1, 6])), "cu_seqlens must start at 0"),
    ("cu-end", _set(cu_seqlens=torch.tensor([0, 5])), "cu_seqlens must end at"),
    ("cu-not-increasing", _set(cu_seqlens=torch.tensor([0, 3, 3, 6])), "cu_seqlens must be strictly increasing"),
    ("cu-short", _set(cu_seqlens=torch.tensor([0])), "cu_seqlens must have at least 2"),
    (
        "cu-batch2",
        _set(cu_seqlens=torch.tensor([0, 6]), **{n: (lambda kw, n=n: kw[n].expand(2, -1, -1, -1)) for n in "qkv"}),
        "cu_seqlens requires batch size 1",
    ),
    ("h0-shape", _set(initial_state=torch.zeros(1, 2, 5, 6)), "initial_state must have shape"),
    ("h0-int", _set(initial_state=torch.zeros(1, 2, 6, 5, dtype=torch.long)), "initial_state must have a floating"),
]


@pytest.mark.parametrize("mutate,match", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise(mutate, match):
    kw = mutate(_good())
    with pytest.raises(ValueError) as exc:
        validate_linear_attention_inputs(kw.pop("q"), kw.pop("k"), kw.pop("v"), **kw)
    assert match in str(exc.value)


def test_bad_call_options_raise():
    q, k, v, _, h0 = make_inputs(1, 6, "none", h0=True)
    with pytest.raises(ValueError, match="initial_state"):
        chunk_linear_attention(q, k, v, causal=False, initial_state=h0)
    with pytest.raises(ValueError, match="output_final_state"):
        chunk_linear_attention(q, k, v, causal=False, output_final_state=True)
    with pytest.raises(ValueError, match="initial_state"):
        linear_attention_recurrent(q, k, v, causal=False, initial_state=h0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="log_decay"):
        linear_attention(q, k, v, log_decay=torch.ones(2, dtype=torch.float64))


def test_backend_choice_is_validated():
    q = torch.randn(1, 4, 2, 3)
    with pytest.raises(ValueError, match="backend must be"):
        chunk_linear_attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="backend='fla' needs CUDA"):
        chunk_linear_attention(q, q, q, backend="fla")
    # auto on CPU is the pure-torch kernel
    o_auto, _ = chunk_linear_attention(q, q, q, backend="auto")
    o_torch, _ = chunk_linear_attention(q, q, q, backend="torch")
    assert torch.equal(o_auto, o_torch)
