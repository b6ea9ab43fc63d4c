"""The translation task and everything only it uses: corpora and SentencePiece
(``corpora``), the TFDS builder for IWSLT'15 (``iwslt15``), beam search (``decoding``),
Vaswani et al.'s recipes (``recipes``) and the train step / BLEU evaluation (``task``)."""
