"""Decoding is what the caller asks for (`llmkd.generation`), whatever the checkpoint's
generation_config.json ships; and the tiny random models and byte tokenizer the generation tests share.
"""

import pytest
import torch

from llmkd import generation

# A checkpoint shipping everything that would bend greedy decoding or sampling. The first five are
# the (Qwen2.5-Instruct ships a repetition penalty, Llama-3.1-Instruct temperature and top_p);
# suppress_tokens and min_p are off only as None, which no config passed to `generate` can pin.
LEAKY = dict(do_sample=True, repetition_penalty=1.5, no_repeat_ngram_size=2, top_k=5, temperature=0.6, top_p=0.9,
             suppress_tokens=list(range(0, 256, 3)), min_p=0.2)
PROMPTS = ["The quick brown fox", "1 + 1 = 2; 2 + 2 =", "aaaaaaaa"]


def byte_tokenizer():
    """A byte-level tokenizer with no merges: 256 byte tokens and an end-of-text token (id 256)."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_model(model_type: str, **overrides):
    """A random 2-layer model of `model_type`, hidden 64, over the byte tokenizer's 257 ids."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{
        **dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, bos_token_id=256, eos_token_id=256,
               pad_token_id=256),
        **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def plain_and_leaky(tmp_path_factory):
    """The same weights saved twice, with a neutral generation_config and with LEAKY, loaded back."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = tiny_model("llama")
    root = tmp_path_factory.mktemp("checkpoints")
    for name, extra in (("plain", {}), ("leaky", LEAKY)):
        model.generation_config = GenerationConfig(eos_token_id=256, pad_token_id=256, **extra)
        model.save_pretrained(root / name)
    return tuple(AutoModelForCausalLM.from_pretrained(root / name).eval() for name in ("plain", "leaky"))


def _ids(completions):
    return [c.token_ids for c in completions]


def test_checkpoint_generation_config_leaks_into_transformers_generate(plain_and_leaky, tok):
    # The premise: transformers' own generate, told do_sample=False, still applies the checkpoint's settings.
    from transformers import GenerationConfig

    plain, leaky = plain_and_leaky
    ids = torch.tensor([tok(PROMPTS[0])["input_ids"]])
    config = GenerationConfig(max_new_tokens=24, do_sample=False)
    assert not torch.equal(plain.generate(ids, generation_config=config), leaky.generate(ids, generation_config=config))


def test_greedy_ignores_the_checkpoint_generation_config(plain_and_leaky, tok):
    plain, leaky = plain_and_leaky
    kw = dict(batch_size=3, max_new_tokens=24, progress=False)
    want, _ = generation.generate(plain, tok, PROMPTS, **kw)
    got, _ = generation.generate(leaky, tok, PROMPTS, **kw)
    assert _ids(got) == _ids(want)
    assert leaky.generation_config.repetition_penalty == 1.5  # the model's own config is left as loaded


def test_sampling_ignores_the_checkpoint_generation_config(plain_and_leaky, tok):
    plain, leaky = plain_and_leaky
    kw = dict(batch_size=2, max_new_tokens=24, do_sample=True, temperature=1.3, seed=3, progress=False)
    want, _ = generation.generate(plain, tok, PROMPTS, **kw)
    got, _ = generation.generate(leaky, tok, PROMPTS, **kw)
    assert _ids(got) == _ids(want)


@torch.no_grad()
def test_sampling_is_softmax_over_temperature_alone(plain_and_leaky, tok):
    # No top-k (transformers' default is 50), top-p or penalty: each token is drawn from
    # softmax(logits / temperature), with the seed the caller gave.
    plain, leaky = plain_and_leaky
    prompt = tok(PROMPTS[1])["input_ids"]
    torch.manual_seed(11)
    ids, drawn = torch.tensor([prompt]), []
    for _ in range(24):
        probs = torch.softmax(plain(input_ids=ids).logits[:, -1].float() / 0.8, dim=-1)
        drawn.append(int(torch.multinomial(probs, num_samples=1)))
        if drawn[-1] == 256:
            break
        ids = torch.cat([ids, torch.tensor([[drawn[-1]]])], dim=1)
    for model in (plain, leaky):
        out, _ = generation.generate(model, tok, [PROMPTS[1]], batch_size=1, max_new_tokens=24, do_sample=True,
                          temperature=0.8, seed=11, progress=False)
        assert out[0].token_ids == drawn


def test_decoding_settings_state_the_effective_settings():
    greedy = generation.decoding_settings(max_new_tokens=48, stop_strings=["Question:"])
    assert greedy == {
        "do_sample": False, "temperature": 1.0, "top_k": None, "top_p": 1.0, "min_p": None, "typical_p": 1.0,
        "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "num_beams": 1, "max_new_tokens": 48,
        "stop_strings": ["Question:"], "seed": None, "checkpoint_generation_config": "ignored",
    }
    sampled = generation.decoding_settings(max_new_tokens=8, do_sample=True, temperature=0.7, seed=5)
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_k"], sampled["seed"]) == (True, 0.7, 0, 5)
