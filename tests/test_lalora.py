"""LaLoRA: curvature estimates against brute force, the penalty's value and gradient, registry, save/load,
and its effect on training."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

import disel
from disel.errors import UserError
from disel.experiments.lalora_sweep import lambda_sweep, plot_sweep, train_plain
from disel.methods import MethodOptions, build_model
from disel.methods.lalora import (
    CURVATURE_FILE,
    LaplacePenalty,
    checkpoint_callback,
    estimate_curvature,
    get_penalty,
    load_curvature,
    penalty,
    save_curvature,
    set_lambda,
)
from disel.methods.lalora.curvature import CurvatureState, lora_sites
from disel.testing import TinyMLP, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread_module")


def lm_batches(n: int = 3, bsz: int = 3, seq: int = 10, seed: int = 0, pad: bool = True) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 120, (bsz, seq), generator=g)
        mask = torch.ones_like(ids)
        if pad:
            mask[0, seq - 3 :] = 0  # right padding on one row
        labels = ids.clone()
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def set_up_nonzero(model: torch.nn.Module, seed: int = 1, gate_bias: float | None = None) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
            if gate_bias is not None and "lora_gate" in name and name.endswith("bias"):
                p.fill_(gate_bias)


def brute_force_diag(model: torch.nn.Module, batches: list[dict], params: dict[str, torch.nn.Parameter]):
    """Per-example (per-sequence) gradients one at a time, squared, summed, divided by predicted tokens."""
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    tokens = 0
    model.eval()
    for b in batches:
        for i in range(b["input_ids"].shape[0]):
            ids, mask, lab = b["input_ids"][i : i + 1], b["attention_mask"][i : i + 1], b["labels"][i : i + 1]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            tgt = lab[:, 1:]
            valid = tgt != -100
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt.clamp_min(0).reshape(-1), reduction="none"
            )
            loss = (nll * valid.reshape(-1)).sum()
            tokens += int(valid.sum())
            grads = torch.autograd.grad(loss, list(params.values()))
            for n, gr in zip(params, grads):
                acc[n] += gr.detach() ** 2
    return {n: v / tokens for n, v in acc.items()}


@pytest.mark.parametrize("method", ["lora", "disel"])
def test_diag_matches_brute_force_per_example_gradients(method):
    torch.manual_seed(0)
    model = build_model(
        tiny_model("llama", hidden=16).double(), method, rank=2, target_modules=["q_proj", "down_proj"]
    )
    set_up_nonzero(model, gate_bias=0.5)  # real U != 0: the per-example gradients of D are non-trivial
    batches = lm_batches()
    state = estimate_curvature(
        model,
        batches,
        curvature="diag",
        fisher="empirical",
        n_batches=None,
        include_gates=True,
        gates="actual",
    )
    named = dict(model.named_parameters())
    keys = [n for n in named if "lora_" in n and ("weight" in n or "gate" in n)]
    params = {n: named[n] for n in keys}
    expected = brute_force_diag(model, batches, params)
    assert set(state.diag) == set(expected)
    assert len(expected) == (8 if method == "lora" else 16)  # 2 layers x 2 modules x (A, B [, W_g, b_g])
    for n in expected:
        assert expected[n].abs().sum() > 0
        torch.testing.assert_close(state.diag[n].double(), expected[n], rtol=1e-5, atol=1e-12)


def test_zero_up_projection_handled_by_virtual_u_without_moving_the_model():
    model = build_model(tiny_model("gpt2"), "lora", rank=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    zero = estimate_curvature(model, lm_batches(pad=False), up_init="none", n_batches=2)
    virt = estimate_curvature(model, lm_batches(pad=False), up_init="virtual", n_batches=2)
    a_keys = [n for n in zero.diag if "lora_A" in n]
    assert a_keys and all(float(zero.diag[n].abs().sum()) == 0.0 for n in a_keys)
    assert all(float(virt.diag[n].sum()) > 0.0 for n in a_keys)
    b_keys = [n for n in zero.diag if "lora_B" in n]
    for n in b_keys:  # the U-block does not depend on the virtual U
        torch.testing.assert_close(zero.diag[n], virt.diag[n])
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])


def _state_and_theta(kind: str, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    shapes = {"a.weight": (3, 5), "b.weight": (4, 3)}
    theta0 = {n: torch.randn(s, generator=g, dtype=dtype) for n, s in shapes.items()}
    st = CurvatureState(curvature=kind, fisher="true")
    for n, (o, i) in shapes.items():
        if kind == "diag":
            st.diag[n] = torch.rand(o, i, generator=g, dtype=dtype)
        else:
            ma, mg = torch.randn(i, i, generator=g, dtype=dtype), torch.randn(o, o, generator=g, dtype=dtype)
            st.kfac[n] = (ma @ ma.T, mg @ mg.T)
    return st, theta0


@pytest.mark.parametrize("kind", ["diag", "kfac"])
def test_penalty_zero_at_theta0_and_gradcheck(kind):
    st, theta0 = _state_and_theta(kind)
    names = list(theta0)
    at0 = LaplacePenalty(
        {n: theta0[n].clone().requires_grad_() for n in names}, theta0, st, lam=2.5, prior_prec=0.1
    )
    assert float(at0()) == 0.0

    def f(*xs):
        return LaplacePenalty(dict(zip(names, xs)), theta0, st, lam=2.5, prior_prec=0.1)()

    g = torch.Generator().manual_seed(4)
    xs = tuple(
        (theta0[n] + torch.randn(theta0[n].shape, generator=g, dtype=torch.float64)).requires_grad_()
        for n in names
    )
    assert torch.autograd.gradcheck(f, xs)
    # analytic gradient: lam * (P + prior I) d
    grads = torch.autograd.grad(f(*xs), xs)
    for n, x, gr in zip(names, xs, grads):
        d = (x - theta0[n]).detach()
        if kind == "diag":
            want = 2.5 * (st.diag[n] * d + 0.1 * d)
        else:
            A, G = st.kfac[n]
            want = 2.5 * (G @ d @ A + 0.1 * d)
        torch.testing.assert_close(gr, want)


def test_kfac_factors_and_penalty_equal_explicit_kronecker_form_on_tiny_layer():
    torch.manual_seed(0)
    model = get_peft_model(TinyMLP().double().eval(), LoraConfig(r=3, lora_alpha=6, target_modules=["lin0"]))
    set_up_nonzero(model)
    g = torch.Generator().manual_seed(5)
    batches = [
        {
            "x": torch.randn(6, 16, generator=g, dtype=torch.float64),
            "labels": torch.randint(0, 4, (6,), generator=g),
        }
    ]
    st = estimate_curvature(model, batches, curvature="kfac", fisher="empirical", n_batches=None)
    (site,) = lora_sites(model)
    # by hand: input of D is x, input of U is D x; output gradient of U is scaling * dL/dy
    x = batches[0]["x"]
    captured = {}
    h = model.base_model.model.lin0.register_forward_hook(lambda m, i, o: captured.setdefault("y", o))
    logits = model(x=x)
    h.remove()
    loss = F.cross_entropy(logits, batches[0]["labels"], reduction="sum")
    gy = torch.autograd.grad(loss, captured["y"])[0]
    scaling = model.base_model.model.lin0.scaling["default"]
    gB = scaling * gy
    U, D = site.B.weight.detach(), site.A.weight.detach()
    n = x.shape[0]
    want = {
        "A": ((x.T @ x) / n, ((gB @ U).T @ (gB @ U)) / n),
        "B": (((x @ D.T).T @ (x @ D.T)) / n, (gB.T @ gB) / n),
    }
    names = {id(p): k for k, p in model.named_parameters()}
    for part, mod in (("A", site.A), ("B", site.B)):
        A_f, G_f = st.kfac[names[id(mod.weight)]]
        torch.testing.assert_close(A_f.double(), want[part][0], rtol=1e-5, atol=1e-10)
        torch.testing.assert_close(G_f.double(), want[part][1], rtol=1e-5, atol=1e-10)
    # the penalty is the explicit vec(d)^T (A kron G) vec(d) with column-major vec
    params = {names[id(site.A.weight)]: site.A.weight, names[id(site.B.weight)]: site.B.weight}
    theta0 = {k: p.detach().clone() for k, p in params.items()}
    st64 = CurvatureState(
        "kfac", "empirical", kfac={k: (a.double(), gg.double()) for k, (a, gg) in st.kfac.items()}
    )
    reg = LaplacePenalty(params, theta0, st64, lam=3.0)
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    explicit = 0.0
    for k, p in params.items():
        d = (p - theta0[k]).detach()
        vec = d.T.reshape(-1)
        A_f, G_f = st64.kfac[k]
        explicit += float(vec @ torch.kron(A_f, G_f) @ vec)
    assert explicit > 0
    torch.testing.assert_close(float(reg()), 1.5 * explicit, rtol=1e-10, atol=0)


@pytest.mark.parametrize(("method", "arch"), [("lalora", "gpt2"), ("disel+lalora", "llama")])
def test_registry_builds_lalora_methods(method, arch):
    opts = MethodOptions(
        rank=2, calibration=lambda: lm_batches(pad=False), options={"lalora": {"lam": 3.0, "n_batches": 2}}
    )
    model = build_model(tiny_model(arch), method, opts)
    reg = get_penalty(model)
    assert reg in model._disel_regularizers and reg.lam == 3.0
    assert float(penalty(model)) == 0.0
    assert all("lora_gate" not in n for n in reg.params)  # gates unpenalised by default
    assert any(isinstance(m, disel.DiselGate) for m in model.modules()) == (method == "disel+lalora")
    with pytest.raises(UserError, match="calibration"):
        build_model(tiny_model(arch), method, rank=2)
    with pytest.raises(UserError, match="Unknown option.*lamda.*did you mean .lam."):
        build_model(
            tiny_model(arch), method, rank=2, calibration=lm_batches, options={"lalora": {"lamda": 1}}
        )
    with pytest.raises(UserError, match="curvature="):
        build_model(
            tiny_model(arch),
            method,
            rank=2,
            calibration=lm_batches,
            options={"lalora": {"curvature": "full"}},
        )


@pytest.mark.parametrize("curvature", ["diag", "kfac"])
def test_save_load_round_trip(tmp_path, curvature):
    extra = {
        "lalora": {
            "lam": 2.0,
            "curvature": curvature,
            "n_batches": 2,
            "penalize_gates": True,
            "prior_prec": 0.01,
        }
    }
    model = build_model(
        tiny_model("llama", seed=1), "disel+lalora", rank=2, calibration=lm_batches, options=extra
    )
    path = save_curvature(model, tmp_path)
    assert path.name == CURVATURE_FILE
    fresh = build_model(tiny_model("llama", seed=1), "disel", rank=2)
    reg = load_curvature(fresh, tmp_path)
    orig = get_penalty(model)
    assert reg.lam == 2.0 and reg.prior_prec == 0.01 and set(reg.params) == set(orig.params)
    g = torch.Generator().manual_seed(0)
    noise = {n: torch.randn(p.shape, generator=g) * 0.1 for n, p in orig.params.items()}
    with torch.no_grad():
        for m in (model, fresh):
            named = dict(m.named_parameters())
            for n, e in noise.items():
                named[n].add_(e)
    assert float(penalty(model)) > 0
    torch.testing.assert_close(penalty(fresh), penalty(model))
    # building with curvature_dir resumes instead of estimating (no calibration needed)
    resumed = build_model(
        tiny_model("llama", seed=1),
        "disel+lalora",
        rank=2,
        options={"lalora": {"curvature_dir": str(tmp_path)}},
    )
    assert set(get_penalty(resumed).params) == set(orig.params)
    # the Trainer callback writes the same file into checkpoint-<step>/
    cb = checkpoint_callback()
    cb.on_save(
        SimpleNamespace(output_dir=str(tmp_path)),
        SimpleNamespace(is_world_process_zero=True, global_step=3),
        None,
        model=model,
    )
    again = load_curvature(fresh, tmp_path / "checkpoint-3")
    assert again is not reg and fresh._disel_regularizers == [again]
    torch.testing.assert_close(penalty(fresh), penalty(model))
    with pytest.raises(UserError, match="lacks"):
        load_curvature(build_model(tiny_model("gpt2"), "lora", rank=2), tmp_path)


def test_lambda_zero_equals_plain_lora_training():
    data = lm_batches(n=2, seed=7)
    torch.manual_seed(0)
    plain = build_model(tiny_model("llama"), "lora", rank=2)
    torch.manual_seed(0)
    la = build_model(
        tiny_model("llama"), "lalora", rank=2, calibration=lm_batches, options={"lalora": {"lam": 0.0}}
    )
    l1 = train_plain(plain, data, steps=4, lr=1e-2)
    l2 = train_plain(la, data, steps=4, lr=1e-2)
    assert l1 == l2
    trained = dict(la.named_parameters())
    moved = 0
    for n, p in plain.named_parameters():
        assert torch.equal(p, trained[n]), n
        moved += int("lora_B" in n and bool(p.any()))
    assert moved > 0


def test_larger_lambda_keeps_theta_closer_to_theta0(tmp_path):
    data = lm_batches(n=2, seed=7)
    base = build_model(
        tiny_model("llama"),
        "lalora",
        rank=2,
        calibration=lambda: lm_batches(n=2),
        options={"lalora": {"curvature": "kfac"}},
    )
    save_curvature(base, tmp_path)

    def make(lam: float):
        torch.manual_seed(0)
        m = build_model(tiny_model("llama"), "lora", rank=2)
        load_curvature(m, tmp_path, lam=lam)
        return m

    points = lambda_sweep(
        make,
        [0.0, 1e3, 1e5],
        data,
        lambda m: {"target": 0.0, "retention": get_penalty(m).distance()},
        steps=6,
        lr=1e-2,
        out_dir=tmp_path,
    )
    dist = [p["distance"] for p in points]
    assert dist[0] > dist[1] > dist[2] > 0
    png = (tmp_path / "lambda_sweep.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    # plot_sweep writes the figure itself (atomically, no temp file left) and returns where it went.
    direct = plot_sweep(points, tmp_path / "sub" / "curve.png")
    assert direct == tmp_path / "sub" / "curve.png" and direct.read_bytes() == png
    assert [f.name for f in direct.parent.iterdir()] == ["curve.png"]
    m = make(0.0)
    set_lambda(m, 7.0)
    assert get_penalty(m).lam == 7.0
    with pytest.raises(UserError, match="lam="):
        set_lambda(m, -1.0)
