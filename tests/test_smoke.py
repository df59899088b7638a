import subprocess
import sys

import peft
import pytest
import torch

import disel
from disel.testing import tiny_model


@pytest.mark.slow
def test_init_equals_base_and_cli_lists_methods():
    model = tiny_model("llama")
    x = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        base = model(x).logits.clone()
    pm = peft.get_peft_model(model, disel.DiselConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        assert torch.equal(pm(x).logits, base)
    out = subprocess.run(
        [sys.executable, "-m", "disel.cli", "methods"], capture_output=True, text=True, check=True
    ).stdout
    assert "disel" in out and "lora" in out


def test_package_and_sandbox_imports_load_no_torch():
    """``import disel`` (the CLI's start) and the sandbox's worker module stay cheap: no torch, no peft."""
    code = (
        "import sys, disel, disel.evaluation, disel.evaluation.sandbox\n"
        "heavy = sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "from disel.evaluation import token_nll\n"
        "assert 'torch' in sys.modules and callable(token_nll)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
