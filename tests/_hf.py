"""Test helper for Hugging Face encoders: ONNX export wants tensors out, not a ModelOutput."""
from torch import nn


class LastHidden(nn.Module):
    """``inner(input_ids, attention_mask).last_hidden_state`` as a plain tensor."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
