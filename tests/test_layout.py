"""`python -m trainer layout` on meta-device full-size architectures.

Expected counts follow kohya sd-scripts' module rules (networks/lora.py): lierla takes every
Linear / 1x1 Conv2d inside Transformer2DModel blocks and the CLIP attention/MLP Linears.
SD1.5 UNet: 16 transformer blocks x (proj_in, proj_out, 4 attn1, 4 attn2, ff.net.0.proj,
ff.net.2 = 12) = 192; CLIP-L: 12 layers x 6 = 72. SDXL UNet: 70 transformer blocks x 10
(attn1 4, attn2 4, ff 2) + 11 Transformer2DModel x 2 (proj_in/out) = 722; CLIP-G 32 x 6 = 192.
"""

import pytest

from trainer.cli import main


@pytest.mark.parametrize("family,expected", [("sd1", 192 + 72), ("sdxl", 722 + 72 + 192)])
def test_layout_counts_match_kohya(family, expected, capsys):
    assert main(["layout", "--family", family]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"modules: {expected}  parameters: ")


def test_layout_block_filter_and_errors(capsys):
    assert main(["layout", "--family", "sd1", "--element", "CrossAttention", "--blocks", "IN01,M00"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("modules: 8  ")  # 4 attn2 linears in IN01 + 4 in M00
    assert all("attn2" in line for line in lines[:-2])
    assert main(["layout", "--family", "sdxl", "--blocks", "IN11"]) == 2
    assert "IN11" in capsys.readouterr().err
