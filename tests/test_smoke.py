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
