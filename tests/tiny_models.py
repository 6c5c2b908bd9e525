"""Tiny models built from code or configs, shared by the tests (seeded; eval mode where the caller needs it)."""

import torch
from torch import nn


class MLP(nn.Module):
    """``X`` ``(B, 6)`` -> ``lin0`` -> tanh -> ``lin1`` -> ``(B, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 8)
        self.lin1 = nn.Linear(8, 3)

    def forward(self, X):
        return self.lin1(torch.tanh(self.lin0(X)))


class Tiny(nn.Module):
    """``x`` ``(B, T, 8)`` -> ``lin0`` -> ReLU -> ``lin1`` -> ``(B, T, 3)`` (MoE-CL goes beside ``lin0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 8)
        self.lin1 = nn.Linear(8, 3)

    def forward(self, x, attention_mask=None):
        return self.lin1(torch.relu(self.lin0(x)))


def tiny_bert():
    """A 2-layer ``BertModel`` (vocab 64, hidden 16), seeded, in eval mode."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    return BertModel(cfg).eval()


def tiny_llama():
    """A 2-layer ``LlamaForCausalLM`` (vocab 64, hidden 16, pad id 0), seeded, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_clip():
    """A ``CLIPModel`` with 2-layer towers of different widths (text: vocab 99, hidden 24; vision: 32x32 images,
    patch 8, hidden 32; projection 16), seeded, in eval mode; its text tower pools at the first ``<|endoftext|>``
    (id 1), where :func:`clip_tokenizer` ends a text."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tower = {"intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {"hidden_size": 24, "vocab_size": 99, "max_position_embeddings": 32, "bos_token_id": 0, "eos_token_id": 1}
    cfg = CLIPConfig(
        text_config={**tower, **text, "pad_token_id": 1},
        vision_config={**tower, "hidden_size": 32, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    return CLIPModel(cfg).eval()


BLIP2_IMAGE_TOKEN = 63  # tiny_blip2's image placeholder id: the last id of its 64-token vocabulary


def tiny_blip2():
    """A ``Blip2ForConditionalGeneration``: a 1-layer vision tower (16x16 images, patch 8, hidden 16), a 2-layer
    Q-Former (hidden 16, cross-attention in every layer, 4 query tokens), ``language_projection`` 16 -> 24 and a
    2-layer Llama decoder (vocab 64, hidden 24; pad 0, bos 1, eos 2), seeded, in eval mode.

    Initialized wider than transformers does (std 0.2 in the vision tower, 0.3 in the decoder, random query tokens),
    so that, as in a trained BLIP-2, images move the Q-Former's output and the query outputs move the decoder's
    logits: with the defaults (vision 1e-10, zero query tokens, decoder 0.02) every image embeds the same, the
    Q-Former's first layer norm divides by ~0 and the decoder's logits stay near uniform whatever its inputs.

    ``input_ids`` must start with the 4 image placeholders (:data:`BLIP2_IMAGE_TOKEN`), where the projected query
    outputs go; ``generate(pixel_values=..., input_ids=...)`` returns the prompt followed by the new tokens."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    torch.manual_seed(0)
    cfg = Blip2Config(
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 16,
            "patch_size": 8,
            "initializer_range": 0.2,
        },
        qformer_config={
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "encoder_hidden_size": 16,
            "cross_attention_frequency": 1,
            "vocab_size": 64,
            "max_position_embeddings": 32,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": 64,
            "hidden_size": 24,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "intermediate_size": 32,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "initializer_range": 0.3,
        },
        num_query_tokens=4,
        image_token_index=BLIP2_IMAGE_TOKEN,
    )
    model = Blip2ForConditionalGeneration(cfg)
    with torch.no_grad():
        model.query_tokens.normal_()  # transformers' zeros make the Q-Former's first layer norm (eps 1e-12) blow up
    return model.eval()


def clip_tokenizer():
    """CLIP's byte-level BPE over single letters (word ends as ``x</w>``) plus two merged words, built offline."""
    import string

    from transformers import CLIPTokenizer

    letters = list(string.ascii_lowercase)
    vocab = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters), "ca", "cat</w>"]
    merges = [("c", "a"), ("ca", "t</w>")]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=32)


WORDS = "what is capital of france italy spain paris rome madrid answer question color sky grass blue green".split()
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: tiny_llama's pad id is 0 (its config's bos 1, eos 2)
PAD, BOS, EOS = 0, 1, 2


def word_tokenizer(bos: bool = True, pad: bool = True, eos: bool = True):
    """A word-level ``PreTrainedTokenizerFast`` over exactly 64 tokens (tiny_llama's vocabulary: every id the model
    can emit decodes to a word), punctuation split off; ``bos``: Llama-style (BOS added in front of a text, as the
    post-processor of Llama tokenizers does), else GPT-2-style (nothing added); ``pad``/``eos``: with a pad/EOS
    token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [*SPECIALS, ":", "?", ".", *WORDS]
    vocab += [f"w{i}" for i in range(len(vocab), 64)]
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    special = {"unk_token": "<unk>"}
    if eos:
        special["eos_token"] = "</s>"
    if bos:
        special["bos_token"] = "<s>"
    if pad:
        special["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)
