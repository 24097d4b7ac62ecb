"""-sm graph and -sm layer over GGUF blocks from the CLI (CPU, 2 gloo ranks; -sm layer also 3 with -ts):
random weights in a llama.cpp mix (--type) and a GGUF file (-m) give the one-process perplexity; splits the
blocks cannot make are one error line.

Tolerance, -sm graph: the printed PPL (~1000) within 1e-5 relative. The split sums float32 products in another
order, and the f16 KV cache then rounds K/V that differ in their last float32 bits to neighbouring halves:
measured ~1e-6 relative (1003.4621 vs 1003.4631 for Q8_0); a mis-cut block or a lost partial sum moves it by
> 1e-3. -sm layer: the same printed digits (tolerance 0): each stage runs whole layers on the same blocks and
hands the activations on unchanged, so the logits are bitwise the one process's.
"""

from __future__ import annotations


import pytest

from glmtg.cli import main
from tests.references.cli_ppl import PPL_FLAGS, final_ppl

REL_TOL = 1e-5


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-q4_0.gguf"
    assert main(["make-gguf", "--preset", "tiny", "--type", "Q4_0", "--device", "cpu", "-o", str(path)]) == 0
    return path


@pytest.mark.parametrize("source, experts", [("type", []), ("gguf", []), ("gguf", ["--tp-experts", "expert"])])
def test_perplexity_graph_equals_one_process(capfd, text_file, gguf_file, source, experts) -> None:
    # tiny's shared expert and routed experts are one block of 32 wide: with the routed experts split along
    # their width (the default), rank 1 holds a zero block of each (glmtg/parallel/experts.py)
    model = ["--type", "Q8_0"] if source == "type" else ["-m", str(gguf_file)]
    one = final_ppl(capfd, "perplexity", "-f", str(text_file), *PPL_FLAGS, *model)
    two = final_ppl(capfd, "perplexity", "-f", str(text_file), *PPL_FLAGS, *model, "-sm", "graph", "--gpus", "2",
                    *experts)
    assert abs(float(two) - float(one)) <= REL_TOL * float(one), (one, two)


@pytest.mark.parametrize("source", ["type", "gguf"])
@pytest.mark.parametrize("split", [("--gpus", "2"), ("--gpus", "3", "-ts", "2,1,1")])
def test_perplexity_layer_equals_one_process(capfd, text_file, gguf_file, source, split) -> None:
    model = ["--type", "Q8_0"] if source == "type" else ["-m", str(gguf_file)]
    one = final_ppl(capfd, "perplexity", "-f", str(text_file), *PPL_FLAGS, *model)
    assert final_ppl(capfd, "perplexity", "-f", str(text_file), *PPL_FLAGS, *model, "-sm", "layer", *split) == one


@pytest.mark.parametrize("flags, message", [
    # Q4_K_M keeps o_proj in q5_k: blocks of 256 do not tile a rank's 6 heads x 64 = 384 columns
    (["--type", "Q4_K_M", "-sm", "graph", "--gpus", "2"], "layers.0.attn.o_proj is q5_k, whose blocks of 256"),
])
def test_bad_quant_split_flags(capfd, text_file, flags, message) -> None:
    rc = main(["perplexity", "-f", str(text_file), *PPL_FLAGS, *flags])
    _, err = capfd.readouterr()
    assert rc == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
