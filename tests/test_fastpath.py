"""The loop's fast path on the CPU: the lean LoRA branch against peft's own layers, compiled layers against eager.

Real torch and peft on tiny Llama models; equality is bitwise where the arithmetic is the same operations.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from raylora.config import ConfigError, demo_config
from raylora.fastpath import Float8Linear, convert_to_float8, install_lean_lora
from raylora.names import EVAL_LOSS, TRAIN_LOSS
from raylora.recipe import activation_checkpointing
from raylora.training import evaluate_adapter, train


def _tiny_peft(dtype: torch.dtype, *, dropout: float = 0.1, targets="all-linear", **lora) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    base = LlamaForCausalLM(config).to(dtype)
    base.requires_grad_(False)
    model = get_peft_model(
        base, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets, **lora)
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; a non-zero B makes every gradient path non-trivial
            torch.nn.init.normal_(param, std=0.1)
    return model


def _step(model: torch.nn.Module, ids: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, dict]:
    model.train()
    torch.manual_seed(5)  # the same dropout masks for both models
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize(
    ("dtype", "autocast"),
    [(torch.float32, False), (torch.bfloat16, True), (torch.float32, True)],
    ids=["fp32", "bf16-autocast", "fp32-autocast"],
)
def test_lean_lora_computes_exactly_what_peft_computes(dtype, autocast):
    peft_model = _tiny_peft(dtype)
    lean = copy.deepcopy(peft_model)
    assert install_lean_lora(lean) == 14  # 7 linear layers x 2 decoder layers
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))

    loss_peft, grads_peft = _step(peft_model, ids, autocast)
    loss_lean, grads_lean = _step(lean, ids, autocast)

    assert torch.equal(loss_peft, loss_lean), (loss_peft, loss_lean)
    assert grads_peft.keys() == grads_lean.keys() and len(grads_peft) == 28
    different = [n for n in grads_peft if not torch.equal(grads_peft[n], grads_lean[n])]
    assert not different, different
    assert all(g.abs().sum() > 0 for g in grads_lean.values())  # dropout and B != 0: every gradient is live


def test_lean_lora_masks_depend_on_the_seed_and_eval_drops_nothing():
    model = _tiny_peft(torch.float32, dropout=0.5)
    install_lean_lora(model)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    first, _ = _step(model, ids, autocast=False)
    model.zero_grad()
    torch.manual_seed(6)
    with torch.no_grad():
        other = model(input_ids=ids, labels=ids).loss  # other masks: another loss
        model.eval()
        eval_a = model(input_ids=ids, labels=ids).loss
        eval_b = model(input_ids=ids, labels=ids).loss
    assert not torch.equal(first, other)
    assert torch.equal(eval_a, eval_b)  # no dropout in eval mode


def _saved_activation_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward, parameters left out, each storage counted once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with (
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        model(input_ids=ids).logits.float().sum().backward()
    return sum(saved.values())


def test_lean_lora_keeps_one_copy_of_each_input_for_backward():
    peft_model = _tiny_peft(torch.bfloat16)
    lean = copy.deepcopy(peft_model)
    install_lean_lora(lean)
    ids = torch.randint(0, 300, (4, 256), generator=torch.Generator().manual_seed(1))
    peft_bytes, lean_bytes = _saved_activation_bytes(peft_model, ids), _saved_activation_bytes(lean, ids)
    # peft keeps a mask (1 byte) and a dropped bf16 copy (2 bytes) per adapted layer; the lean branch keeps
    # the mask and shares the input tensor (already kept once) among q, k, v and among gate, up.
    tokens, d, ff = 4 * 256, 64, 128
    dropped_copies = 2 * tokens * (6 * d + ff) * 2  # 2 layers, 2 bytes per element
    assert peft_bytes - lean_bytes >= 0.8 * dropped_copies, (peft_bytes, lean_bytes, dropped_copies)


def test_lean_lora_leaves_other_adapters_to_peft():
    dora = _tiny_peft(torch.float32, use_dora=True)
    assert install_lean_lora(dora) == 0
    plain = _tiny_peft(torch.float32)
    zeroed = copy.deepcopy(plain)
    install_lean_lora(plain)
    with torch.no_grad():
        for name, param in zeroed.named_parameters():
            if "lora_B" in name:
                param.zero_()  # adapters that add nothing: the base model's own output
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    plain.eval()
    zeroed.eval()
    with torch.no_grad():
        adapted = plain(input_ids=ids).logits
        base = zeroed(input_ids=ids).logits
        with plain.disable_adapter():  # peft's own forward takes over while adapters are disabled
            disabled = plain(input_ids=ids).logits
    assert not torch.allclose(adapted, base)
    assert torch.equal(disabled, base)


class _Losses:
    def __init__(self) -> None:
        self.train: list[float] = []
        self.eval: list[float] = []
        self.adapter_dir: Path | None = None
        self.config = None

    def report(self, metrics: dict[str, float], *, checkpoint_dir: str | None = None) -> None:
        if EVAL_LOSS in metrics:
            self.eval.append(metrics[EVAL_LOSS])
        elif TRAIN_LOSS in metrics:
            self.train.append(metrics[TRAIN_LOSS])


def _run(
    tmp_path: Path,
    compile_mode: str,
    *,
    qlora: bool = False,
    fp8: bool = False,
    dropout: float = 0.1,
    steps: int = 4,
) -> _Losses:
    """A short demo run; train and eval losses every step and every half of the run."""
    config = demo_config()
    config.adapter.dropout = dropout
    config.adapter.qlora = qlora
    config.training.output_dir = str(tmp_path / f"{compile_mode}-qlora-{qlora}-fp8-{fp8}")
    config.training.max_steps = steps
    config.training.warmup_steps = 1
    config.training.log_every = 1
    config.training.eval_every = steps // 2
    config.training.eval_batches = 1
    config.training.checkpoint_every = 0
    config.training.compile = compile_mode
    config.training.fp8 = fp8
    losses = _Losses()
    losses.adapter_dir = Path(train(config, reporter=losses).adapter_dir)
    losses.config = config
    return losses


def test_compiled_layers_train_the_same_steps_as_eager(tmp_path):
    counters.clear()
    eager = _run(tmp_path, "off")
    assert counters["stats"]["unique_graphs"] == 0
    compiled = _run(tmp_path, "aot_eager")
    # dynamo entered the layers: the first layer's graph (its input needs no grad), the others', and the
    # same two again once a batch of another length made the sequence dimension dynamic; evaluation adds
    # none (it runs the layers eagerly).
    assert 2 <= counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    # aot_eager runs the traced graphs with eager kernels, and dropout draws from the same random stream:
    # the same numbers, step for step, up to float reassociation.
    assert compiled.train == pytest.approx(eager.train, rel=1e-6)
    assert compiled.eval == pytest.approx(eager.eval, rel=1e-6)
    assert len(eager.train) == 4 and eager.train[-1] < eager.train[0]


def test_compiled_qlora_with_checkpointing_keeps_the_dropout_masks(tmp_path):
    # Under checkpointing the layer's forward runs again in backward; the LoRA branch is tagged as seeded
    # random so that the compiled recomputation sees the same masks as the first pass, as eager does.
    eager = _run(tmp_path, "off", qlora=True)
    compiled = _run(tmp_path, "aot_eager", qlora=True)
    assert compiled.train == pytest.approx(eager.train, rel=1e-6)


def test_activation_checkpointing_defaults_to_every_layer_with_qlora_only():
    config = demo_config()
    assert config.training.activation_checkpointing is None
    assert activation_checkpointing(config) == 0.0
    config.adapter.qlora = True
    assert activation_checkpointing(config) == 1.0
    config.training.activation_checkpointing = True
    assert activation_checkpointing(config) == 1.0
    config.training.activation_checkpointing = False
    assert activation_checkpointing(config) == 0.0
    config.training.activation_checkpointing = 0.25
    assert activation_checkpointing(config) == 0.25


@pytest.mark.parametrize("checkpointing", ["yes", 1.5, -0.1, float("nan")])
def test_compile_checkpointing_and_fp8_fields_are_validated(checkpointing):
    config = demo_config()
    config.training.compile = "fast"
    config.training.activation_checkpointing = checkpointing
    config.training.fp8 = "on"
    config.training.head_loss = "fused"
    with pytest.raises(ConfigError) as error:
        config.validate()
    message = str(error.value)
    assert "`training.compile` must be one of auto, off, inductor, aot_eager; got 'fast'" in message
    assert "`training.head_loss` must be one of auto, liger, chunked; got 'fused'" in message
    if isinstance(checkpointing, str):  # the wrong type is named first: a string is never read as true
        expected = (
            "`training.activation_checkpointing` must be true or false or a number or None, got 'yes' (str)"
        )
    else:
        expected = (
            "`training.activation_checkpointing` must be true, false, a fraction of the layers in [0, 1] or "
            f"None (every layer with QLoRA, none otherwise), got {checkpointing!r}"
        )
    assert expected in message
    assert "`training.fp8` must be true or false, got 'on'" in message


def test_liger_head_loss_on_the_cpu_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """Liger's kernels need a GPU: asked for on the CPU, the run stops before the tokenizer, data and base
    load, with the field, the value and the fix; `auto` takes the chunked loss there."""
    import raylora.recipe
    from raylora.loss import choose_head_loss
    from raylora.training import train

    config = demo_config()
    config.training.output_dir = str(tmp_path / "run")
    config.training.head_loss = "liger"
    loaded = []
    monkeypatch.setattr(raylora.recipe, "load_tokenizer", lambda *a, **k: loaded.append(a))
    with pytest.raises(ConfigError, match=r"`training.head_loss` is 'liger', but this run trains on the cpu"):
        train(config)
    assert not loaded
    cpu = torch.device("cpu")
    config.training.head_loss = "auto"
    assert choose_head_loss(config.training, cpu, None) is None  # the eager chunked loss
    assert choose_head_loss(config.training, cpu, "aot_eager") is not None  # compiled with the layers


def test_fp8_with_qlora_is_refused_before_any_work():
    config = demo_config()
    config.training.fp8 = True
    config.adapter.qlora = True
    with pytest.raises(
        ConfigError, match=r"`training.fp8` and `adapter.qlora` both quantise the frozen base"
    ):
        config.validate()


# ---- FP8 base layers ----------------------------------------------------------------------------------


def _relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.float() - reference.float()).norm() / reference.float().norm())


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "fp32-under-bf16-autocast"])
def test_float8_linear_is_the_bf16_layer_to_fp8_rounding(autocast):
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True).to(torch.bfloat16).requires_grad_(False)
    fp8 = Float8Linear.from_linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight.element_size() == 1
    assert not fp8.weight.requires_grad and fp8.weight_scale.dtype == torch.float32
    # Half the bytes of the bf16 weight, and the bf16 weight to e4m3's rounding (3 mantissa bits: at most
    # 1/16 off per element, about 2.5% in norm for normal-distributed values).
    assert _relative_error(fp8.weight.float() * fp8.weight_scale, linear.weight) < 0.04

    x_dtype = torch.float32 if autocast else torch.bfloat16
    x = torch.randn(3, 5, 64, dtype=x_dtype, requires_grad=True)
    grad_out = torch.randn(3, 5, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        reference = linear(x)
        ours = fp8(x)
    assert ours.dtype == reference.dtype == torch.bfloat16 and ours.shape == (3, 5, 48)
    (grad_reference,) = torch.autograd.grad(reference, x, grad_out.to(reference.dtype))
    (grad_ours,) = torch.autograd.grad(ours, x, grad_out.to(ours.dtype))
    assert grad_ours.dtype == x_dtype
    # e4m3 inputs and weights: a few percent in norm; the input gradient from e5m2 gradients (2 mantissa
    # bits) a little more. A transposed weight or a wrong scale would be off by ~100%.
    assert _relative_error(ours, reference) < 0.06
    assert _relative_error(grad_ours, grad_reference) < 0.12


def test_float8_linear_never_overflows_to_nan():
    # A cast past e4m3's largest value gives NaN, not the largest value: the scale must keep every element
    # inside the range, an outlier and an all-zero input included.
    linear = torch.nn.Linear(32, 16, bias=False).to(torch.bfloat16).requires_grad_(False)
    fp8 = Float8Linear.from_linear(linear)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    x[0, 0] = 3e4
    for inputs in (x, torch.zeros_like(x)):
        out = fp8(inputs)
        assert torch.isfinite(out).all()
    assert torch.equal(fp8(torch.zeros_like(x)), torch.zeros(4, 16, dtype=torch.bfloat16))


def test_convert_to_float8_replaces_frozen_linears_and_keeps_adapters():
    model = _tiny_peft(torch.bfloat16, targets=["q_proj", "v_proj"])
    install_lean_lora(model)
    layers = list(model.base_model.model.model.layers)
    # 7 linears x 2 decoder layers: q and v under their LoRA wrappers, the 5 others plain.
    assert convert_to_float8(layers) == 14
    attention = layers[0].self_attn
    assert isinstance(attention.q_proj.base_layer, Float8Linear)  # peft's wrapper stays, its base is fp8
    assert isinstance(attention.k_proj, Float8Linear)
    assert attention.q_proj.lora_A["default"].weight.dtype == torch.float32  # the adapter is untouched
    assert isinstance(model.base_model.model.lm_head, torch.nn.Linear)  # the head is outside the layers
    names = {n for n, _ in model.named_parameters()}
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight" in names  # same paths
    assert convert_to_float8(layers) == 0  # nothing left to convert


def test_fp8_training_follows_the_bf16_curve_and_saves_a_plain_adapter(tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    plain = _run(tmp_path, "off", dropout=0.0, steps=6)
    counters.clear()
    fp8 = _run(tmp_path, "aot_eager", fp8=True, dropout=0.0, steps=6)
    assert not counters["graph_break"], dict(counters["graph_break"])  # the fp8 matmul traces whole
    assert counters["stats"]["unique_graphs"] >= 2
    # Another function (the base rounded to fp8), so not equal; the same curve to within 1% at every step
    # (on this model the gap is under 0.2%), and it learns.
    assert fp8.train != plain.train
    assert fp8.train == pytest.approx(plain.train, rel=0.01)
    assert fp8.eval == pytest.approx(plain.eval, rel=0.01)
    assert fp8.train[-1] < fp8.train[0] - 0.5
    # The adapter is an ordinary one: the same tensors as a bf16 run's, and it loads onto the bf16 base.
    weights = load_file(fp8.adapter_dir / "adapter_model.safetensors")
    assert weights.keys() == load_file(plain.adapter_dir / "adapter_model.safetensors").keys()
    from raylora.tiny import materialize_preset

    base = AutoModelForCausalLM.from_pretrained(materialize_preset(demo_config().model.name_or_path))
    loaded = PeftModel.from_pretrained(base, fp8.adapter_dir)
    state = loaded.state_dict()
    (name, tensor), *_ = ((n, t) for n, t in weights.items() if "lora_B" in n)
    assert torch.equal(state[name.replace(".weight", ".default.weight")], tensor)
    # Evaluated afresh, it is on the fp8 base it was trained against: the run's own eval loss, not the bf16
    # base's (which differs by more than the tolerance here).
    assert evaluate_adapter(fp8.config, fp8.adapter_dir) == pytest.approx(fp8.eval[-1], rel=1e-6)
    # Loaded from MLflow for generation, it sits on the bf16 base, and says so.
    from mlflow.tracking import MlflowClient

    from raylora.tracking import load_adapter

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store)
    run = client.create_run(client.create_experiment("fp8"))
    client.log_artifacts(run.info.run_id, str(fp8.adapter_dir), "adapter")
    with pytest.warns(UserWarning, match=r"trained with `training.fp8`.*loaded on the bf16 base"):
        model, _ = load_adapter(run.info.run_id, tracking_uri=store)
    assert not any(isinstance(m, Float8Linear) for m in model.modules())


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_written_out_head_loss_matches_the_chunked_cross_entropy(label_smoothing, autocast_dtype):
    from raylora.loss import ModelOutput, compiled_head_loss, head_loss_and_grad, token_loss_sum

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=False).requires_grad_(False)
    hidden = torch.randn(1, 4100, 32, requires_grad=True)  # three chunks, the last one short
    labels = torch.randint(0, 500, (1, 4100))
    labels[0, ::7] = -100  # ignored positions
    results = []
    for head_loss in (None, head_loss_and_grad, compiled_head_loss("aot_eager")):
        hidden.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_dtype is not None):
            output = ModelOutput(hidden * 1.0, head, autocast_dtype)
            loss = token_loss_sum(output, labels, label_smoothing, head_loss=head_loss)
        (loss / 4000).backward()
        results.append((loss.detach(), hidden.grad.clone()))
    (loss_ref, grad_ref), *others = results
    for loss, grad in others:
        assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-6)
        # fp32: reassociation only; bf16: the gradient is rounded to bf16 from a differently computed softmax
        tolerance = 1e-6 if autocast_dtype is None else 1e-4
        assert ((grad - grad_ref).norm() / grad_ref.norm()).item() < tolerance
