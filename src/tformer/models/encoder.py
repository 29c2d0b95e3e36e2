"""The paper's encoder (section 3.1): the self-attention stack run bidirectionally over the source.

`Encoder` is `TransformerStack` (models/stack.py) under the name of this use, a subclass that adds nothing,
so that a model prints what each stack is for (`Seq2Seq.encoder`, `Classifier.encoder`: Encoder;
`LanguageModel.blocks`: TransformerStack) while the code exists once. Its state-dict keys are the stack's.
"""

from __future__ import annotations

from tformer.models.stack import StackOutput, TransformerStack, check_ids


class Encoder(TransformerStack):
    """Embedding (+ positions, dropout) -> N bidirectional self-attention layers -> optional final norm."""


__all__ = ["Encoder", "StackOutput", "TransformerStack", "check_ids"]
