"""Tokenizers read from a Hugging Face directory: tokenizer.json (+ config files), tokenizer.model,
and the errors for missing or corrupt files."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat_core.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
)

PROPERTY = settings(max_examples=200, deadline=None, database=None)


@pytest.fixture(scope="module")
def smollm2_dir(hf_smollm2, tmp_path_factory) -> str:
    """SmolLM2's tokenizer as transformers saves it (tokenizer.json, tokenizer_config.json,
    chat_template.jinja), with the original digit-splitting pre-tokenizer (see conftest)."""
    directory = tmp_path_factory.mktemp("smollm2_tokenizer")
    hf_smollm2.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def smollm2_from_files(smollm2_dir):
    return load_tokenizer(smollm2_dir)


def copy_dir(source: str, tmp_path, **json_files: dict) -> str:
    """A copy of `source` with the given JSON files written (name without .json -> content)."""
    target = tmp_path / "copy"
    shutil.copytree(source, target)
    for name, content in json_files.items():
        (target / f"{name}.json").write_text(json.dumps(content))
    return str(target)


def edit_json(path: str, **changes) -> None:
    with open(path) as f:
        content = json.load(f)
    content.update(changes)
    with open(path, "w") as f:
        json.dump(content, f)


# --- tokenizer.json ------------------------------------------------------------------------------


def test_tokenizer_json_settings(smollm2_from_files, smollm2_dir, smollm2):
    tok = smollm2_from_files
    assert isinstance(tok, HFTokenizer)
    assert tok.vocab_size == 49152
    assert (tok.bos_token_id, tok.bos_token) == (1, "<|im_start|>")
    assert (tok.eos_token_id, tok.eos_token) == (2, "<|im_end|>")
    assert tok.stop_token_ids == (2,)
    assert tok.add_bos_token is False
    assert tok.chat_template == smollm2.chat_template
    # Newer transformers save the template to chat_template.jinja, older ones into tokenizer_config.json.
    assert tok.chat_template_source in {
        os.path.join(smollm2_dir, "chat_template.jinja"),
        os.path.join(smollm2_dir, "tokenizer_config.json"),
    }
    assert tok.all_special_ids == smollm2.all_special_ids


@PROPERTY
@given(st.one_of(st.text(max_size=50), st.text(alphabet=" \t\n12ab<|>_imstartend", max_size=40)))
def test_tokenizer_json_matches_reference_and_gguf(smollm2_from_files, hf_smollm2, smollm2, text):
    ids = smollm2_from_files.encode(text)
    assert ids == hf_smollm2.encode(text, add_special_tokens=False) == smollm2.encode(text)
    assert smollm2_from_files.decode(ids) == hf_smollm2.decode(ids)
    assert smollm2_from_files.decode(ids, skip_special_tokens=True) == hf_smollm2.decode(ids, skip_special_tokens=True)


def test_tokenizer_json_pickles(smollm2_from_files):
    clone = pickle.loads(pickle.dumps(smollm2_from_files))
    assert clone.encode("<|im_start|>x  42") == smollm2_from_files.encode("<|im_start|>x  42")


def test_generation_config_eos_list_adds_stop_ids(smollm2_dir, tmp_path):
    directory = copy_dir(smollm2_dir, tmp_path, generation_config={"eos_token_id": [0, 2]})
    assert load_tokenizer(directory).stop_token_ids == (2, 0)  # eos first, each once


def test_config_json_is_used_without_generation_config(smollm2_dir, tmp_path):
    directory = copy_dir(smollm2_dir, tmp_path, config={"bos_token_id": 1, "eos_token_id": 0})
    tok = load_tokenizer(directory)
    assert tok.eos_token_id == 2  # tokenizer_config.json names the eos token; config.json adds a stop id
    assert tok.stop_token_ids == (2, 0)


def test_ids_from_config_when_tokenizer_config_names_no_tokens(smollm2_dir, tmp_path):
    directory = copy_dir(smollm2_dir, tmp_path, generation_config={"bos_token_id": 1, "eos_token_id": [2, 0]})
    os.remove(os.path.join(directory, "tokenizer_config.json"))
    tok = load_tokenizer(directory)
    assert (tok.bos_token, tok.eos_token, tok.stop_token_ids) == ("<|im_start|>", "<|im_end|>", (2, 0))
    assert tok.chat_template is not None  # still from chat_template.jinja


def test_special_tokens_map_and_inline_template(smollm2_dir, tmp_path):
    directory = copy_dir(
        smollm2_dir,
        tmp_path,
        tokenizer_config={"chat_template": [{"name": "default", "template": "{{ eos_token }}"}], "add_bos_token": True},
        special_tokens_map={"bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|im_end|>"},
    )
    tok = load_tokenizer(directory)
    assert tok.bos_token_id == 0 and tok.add_bos_token is True
    assert tok.encode("hi") == [0, *tok.encode("hi", add_special_tokens=False)]
    assert tok.apply_chat_template([]) == "<|im_end|>"
    assert tok.chat_template_source.endswith("tokenizer_config.json")


def test_post_processor_bos_is_detected_and_truncation_ignored(smollm2_dir, tmp_path):
    from tokenizers import Tokenizer, processors

    directory = copy_dir(smollm2_dir, tmp_path)
    path = os.path.join(directory, "tokenizer.json")
    backend = Tokenizer.from_file(path)
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.enable_truncation(4)
    backend.save(path)
    tok = load_tokenizer(directory)
    assert tok.add_bos_token is True  # what Llama 3's tokenizer.json does, with no add_bos_token in the config
    ids = tok.encode("one two three four five six")
    assert ids[0] == 1 and ids.count(1) == 1 and len(ids) > 4


def test_bos_token_missing_from_vocab_names_it(smollm2_dir, tmp_path):
    directory = copy_dir(smollm2_dir, tmp_path)
    edit_json(os.path.join(directory, "tokenizer_config.json"), bos_token="<no-such-token>")
    with pytest.raises(TokenizerError, match="<no-such-token>"):
        load_tokenizer(directory)


# --- tokenizer.model -----------------------------------------------------------------------------


def test_tokenizer_model_directory(spm_model_path, tmp_path):
    shutil.copy(spm_model_path, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {"add_bos_token": False, "bos_token": {"content": "<s>"}, "chat_template": "{{ messages[0]['content'] }}"}
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.add_bos_token is False and tok.encode("hello")[0] != 1
    assert (tok.bos_token, tok.eos_token, tok.stop_token_ids) == ("<s>", "</s>", (2,))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "x"


def test_tokenizer_json_is_preferred(smollm2_dir, spm_model_path, tmp_path):
    directory = copy_dir(smollm2_dir, tmp_path)
    shutil.copy(spm_model_path, os.path.join(directory, "tokenizer.model"))
    assert isinstance(load_tokenizer(directory), HFTokenizer)


# --- missing and corrupt files -------------------------------------------------------------------


def test_directory_without_tokenizer_files_gives_none(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None


def test_missing_directory_is_an_error(tmp_path):
    with pytest.raises(TokenizerError, match="no-such-dir"):
        load_tokenizer(tmp_path / "no-such-dir")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model"])
def test_corrupt_vocabulary_file_names_the_path(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x00garbage{")
    with pytest.raises(TokenizerError, match=str(path)):
        load_tokenizer(tmp_path)


def test_corrupt_config_names_the_path(smollm2_dir, tmp_path):
    directory = copy_dir(smollm2_dir, tmp_path)
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, "w") as f:
        f.write("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        load_tokenizer(directory)


def test_bad_eos_list_names_the_file(smollm2_dir, tmp_path):
    directory = copy_dir(smollm2_dir, tmp_path, generation_config={"eos_token_id": ["<|im_end|>"]})
    with pytest.raises(TokenizerError, match="generation_config.json"):
        load_tokenizer(directory)


def test_out_of_range_stop_id_is_an_error(smollm2_dir, tmp_path):
    directory = copy_dir(smollm2_dir, tmp_path, generation_config={"eos_token_id": [2, 10**6]})
    with pytest.raises(TokenizerError, match="1000000"):
        load_tokenizer(directory)


def test_explicit_null_bos_is_kept(smollm2_dir, tmp_path):
    # Qwen2 writes "bos_token": null; config.json's bos_token_id must not fill it in.
    directory = copy_dir(smollm2_dir, tmp_path, config={"bos_token_id": 1})
    edit_json(os.path.join(directory, "tokenizer_config.json"), bos_token=None)
    tok = load_tokenizer(directory)
    assert tok.bos_token is None and tok.bos_token_id is None and tok.add_bos_token is False
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).startswith("<|im_start|>system")
