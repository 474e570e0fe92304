"""`t2i text-import`: a tiny T5 encoder and its tokenizer, made and saved here as `save_pretrained` writes them,
imported as a pipeline's caption encoder; stage two trained against it generates; and what it computes is
transformers' own."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from t2i.cli import app
from unclip.errors import CheckpointError

transformers = pytest.importorskip("transformers", reason="the text extra: pip install 't2i[text]'")
tokenizers = pytest.importorskip("tokenizers")
runner = CliRunner()
WORDS = "a an the digit zero one two three four five six seven eight nine handwritten left right of above next to".split()
CAPTIONS = ["a handwritten seven", "a three next to an eight", "THE digit 4", "an unknown wordle", ""]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory) -> Path:
    """A two-layer T5 encoder with random weights and a word-level tokenizer over the test's words, saved locally."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    folder = tmp_path_factory.mktemp("t5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS + [str(d) for d in range(10)])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    config = transformers.T5Config(vocab_size=len(vocab), d_model=24, d_kv=6, d_ff=48, num_layers=2, num_heads=4,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def imported(t5_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "text"
    r = run("text-import", "--transformers", t5_folder, "--out", out, "--context", 12)
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert "the t5 text encoder" in said and "decoder-train --clip CLIP --text" in said
    return out


def test_the_imported_encoder_and_tokenizer_compute_what_transformers_computes(imported, t5_folder):
    from unclip.components import STAGES
    from unclip.components.text import text_tokenizer

    encoder, cfg = STAGES["text"].load(imported, None, torch.device("cpu"))
    saved = yaml.safe_load((imported / "config.yaml").read_text())
    assert saved["model"]["model_type"] == "t5" and saved["model"]["d_model"] == 24 and saved["context"] == 12
    ours = text_tokenizer(imported, cfg)(CAPTIONS)
    theirs = transformers.AutoTokenizer.from_pretrained(t5_folder)(CAPTIONS, padding="max_length", max_length=12,
                                                                    truncation=True, return_tensors="pt")
    assert torch.equal(ours, theirs["input_ids"])
    assert ours[3].tolist()[:5] == [4, 2, 2, 1, 0]  # "an", two words it does not know, the end token, padding
    reference = transformers.T5EncoderModel.from_pretrained(t5_folder).eval()
    with torch.no_grad():
        emb, features = encoder.encode_text(ours)
        expected = reference(input_ids=ours, attention_mask=theirs["attention_mask"]).last_hidden_state
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=0)
    mask = theirs["attention_mask"][..., None].float()
    torch.testing.assert_close(emb, torch.nn.functional.normalize((expected * mask).sum(1) / mask.sum(1), dim=-1),
                               atol=1e-5, rtol=0)


def test_stage_two_trains_against_the_imported_encoder_and_generates(imported, mnist_dir, tiny_config, tmp_path):
    from unclip.pipeline import Pipeline

    clip = tmp_path / "clip"
    r = run("clip-train", "--config", tiny_config, "--data-dir", mnist_dir, "--out", clip, "--max-steps", 2)
    assert r.exit_code == 0, r.output
    pipe_dir = tmp_path / "pipe"
    r = run("decoder-train", "--clip", clip, "--text", imported, "--config", tiny_config, "--data-dir", mnist_dir,
            "--out", pipe_dir, "--max-steps", 2)
    assert r.exit_code == 0, r.output
    assert (pipe_dir / "text" / "tokenizer" / "tokenizer.json").is_file()
    prior = yaml.safe_load((pipe_dir / "prior" / "config.yaml").read_text())
    # 24 wide where CLIP's embeddings are 32: the prior reads one and draws the other
    assert prior["text"]["width"] == prior["text"]["embed_dim"] == 24 and prior["text"]["context"] == 12
    pipe = Pipeline.load(pipe_dir, "cpu")
    encoder, tokenizer = pipe.captions()
    assert encoder is pipe.text and tokenizer(["a seven"]).shape == (1, 12)
    out = tmp_path / "images"
    r = run("generate", "--checkpoints", pipe_dir, "--prompt", "a handwritten seven", "-n", 2, "--steps", 2,
            "--out", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert len(list(out.glob("0*.png"))) == 2  # and grid.png
    from unclip.api import UnCLIPPipeline
    from unclip.errors import UserError

    api = UnCLIPPipeline.from_pretrained(pipe_dir, device="cpu")
    assert api("a seven", num_images_per_prompt=2, num_inference_steps=2, output_type="uint8").images.shape[0] == 2
    with pytest.raises(UserError, match="leave it at 1"):  # DALL-E 2's reranking needs CLIP's text embedding
        api("a seven", num_inference_steps=2, prior_candidates=2)
    # a stage trained against CLIP's text tower does not load beside a text/ encoder
    shutil.copytree(pipe_dir, tmp_path / "mixed")
    r = run("decoder-train", "--clip", clip, "--config", tiny_config, "--data-dir", mnist_dir, "--out",
            tmp_path / "clip-read", "--max-steps", 1, "--stage", "prior")
    assert r.exit_code == 0, r.output
    shutil.rmtree(tmp_path / "mixed" / "prior")
    shutil.copytree(tmp_path / "clip-read" / "prior", tmp_path / "mixed" / "prior")
    with pytest.raises(CheckpointError, match="trained against CLIP's text tower"):
        Pipeline.load(tmp_path / "mixed", "cpu")


def test_bad_imports_are_refused_in_one_line(t5_folder, imported, tmp_path):
    r = run("text-import", "--transformers", tmp_path, "--out", tmp_path / "t")
    assert r.exit_code == 1 and "no config.json" in r.output
    pickled = tmp_path / "pickled"
    shutil.copytree(t5_folder, pickled)
    (pickled / "model.safetensors").unlink()
    r = run("text-import", "--transformers", pickled, "--out", tmp_path / "t")
    assert r.exit_code == 1 and "no .safetensors weights" in r.output
    r = run("text-import", "--transformers", t5_folder, "--out", imported)
    assert r.exit_code == 1 and "--overwrite" in r.output and len(r.output.strip().splitlines()) == 1
