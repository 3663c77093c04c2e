"""``tiny:lm``: a tiny random-weight causal language model with a tiny tokenizer and a chat
template, built in code with no network, so the text stage runs in tests and the demo.

It is a Llama-architecture model of two layers, 64 wide, over a word-level vocabulary of a few
hundred words of video-prompt English and ``.``/``,`` (anything else reads as ``<unk>``), with a ChatML chat
template as Qwen's. Its weights are seeded, so the same kind always gives the same model and a
rewrite made with it is reproducible. What it writes is word soup; everything around it (chat
template, left padding, batching, sampling, the cache) is the real thing. Importing this module
loads neither torch nor transformers.
"""

from __future__ import annotations

TINY_PREFIX = "tiny:"
TINY_LM_KINDS = ("lm",)  # for ``reelfarm make-tiny-model --kind``
_WEIGHT_SEED = 0
PAD, START, END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
ROLES = ("system", "user", "assistant")
PUNCTUATION = (".", ",")
WORDS = """a an the of in on at under over through across along into from with and as while
toward behind beside above below near far slowly gently quickly softly suddenly steadily fox
cat dog horse bird birds deer wolf owl fish whale butterfly man woman child children girl boy
old young couple crowd dancer runner city street alley market harbor bridge tower train car
boat ship road river lake ocean sea waves beach shore forest trees tree meadow field garden
flowers grass desert dunes mountain mountains valley hill cliff cave snow rain fog mist storm
clouds sky sun moon stars night morning evening dawn dusk sunset sunrise light shadow shadows
reflections window room kitchen table lamp candle fire smoke dust leaves water ice glass
neon golden silver red orange yellow green blue purple white black warm cool soft bright dark
misty glowing shimmering quiet busy ancient modern small large tall wide tiny vast wet dry
walks runs flies swims dances jumps turns looks smiles drifts falls rises flows sways spins
glides moves stands sits waits watches camera pans tilts tracks zooms dolly orbits follows
shot close up wide aerial view handheld static slow motion cinematic detailed realistic
photorealistic film grain depth of field lens bokeh lighting backlit atmosphere mood scene
background foreground frame colors texture details high quality 4k""".split()
# ChatML, as Qwen's instruct models write it.
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def is_tiny_lm(path: str) -> bool:
    """``path`` names the tiny language model (``tiny:lm``)."""
    return path.startswith(TINY_PREFIX) and path[len(TINY_PREFIX):] in TINY_LM_KINDS


def vocabulary() -> dict[str, int]:
    """Token -> id: the special tokens first (the pad token is id 0), then words."""
    tokens = list(dict.fromkeys([*SPECIALS, *ROLES, *PUNCTUATION, *WORDS]))
    return {token: i for i, token in enumerate(tokens)}


def build_tiny_tokenizer():
    """The word-level tokenizer, its pad token ``<|endoftext|>`` and end ``<|im_end|>``, padding
    on the left (what batched generation needs), with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                  pre_tokenizers.Punctuation()])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=END,
                                        unk_token=UNK, additional_special_tokens=[START, END],
                                        padding_side="left", model_max_length=4096)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_lm():
    """(model, tokenizer): the tiny causal LM in eval mode, with seeded random weights."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    vocab = vocabulary()
    # Heads 32 wide, the narrowest vLLM's attention kernels take (FlashAttention: 32 to 256),
    # so the vllm engine loads the same model; two query heads share one key/value head.
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=None, eos_token_id=vocab[END], pad_token_id=vocab[PAD])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_WEIGHT_SEED)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=vocab[END], pad_token_id=vocab[PAD])
    return model.eval(), tokenizer


def save_tiny_lm(directory: str) -> None:
    """Write the tiny LM as a transformers folder (safetensors, tokenizer, chat template), which
    ``AutoModelForCausalLM`` and ``AutoTokenizer`` load as a published model."""
    from rendering.pipelines.weights import quiet_progress_bars

    model, tokenizer = build_tiny_lm()
    with quiet_progress_bars():
        model.save_pretrained(directory, safe_serialization=True)
        tokenizer.save_pretrained(directory)
