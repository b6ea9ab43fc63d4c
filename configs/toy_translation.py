"""A small Transformer on the offline toy translation task (smoke test and benchmark).

    resnorm-train --config=configs/toy_translation.py --workdir=runs/toy

The toy language (``resnorm_jax/tasks/translation/corpora.py``): the target is the reversed source with a
fixed word mapping.  Any ``model.skip`` works, e.g. ``--config.model.skip=rskip_ln:2``.
"""

from resnorm_jax.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.data.name = "toy_translation"
  c.model.name = "transformer"
  c.model.preset = "tiny"
  c.model.norm = "layer"
  c.model.skip = "pre_ln"
  c.model.vocab_size = 128
  c.model.max_len = 64
  c.model.dropout_rate = 0.0
  c.translation.max_length = 32
  c.translation.max_tokens = 2048
  c.translation.toy_train_size = 20_000
  c.translation.toy_test_size = 200
  c.translation.toy_vocab = 40
  c.translation.toy_max_words = 10
  c.train.optimizer = "adam"
  c.train.b1, c.train.b2, c.train.eps = 0.9, 0.98, 1e-9
  c.train.schedule = "rsqrt"
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 200
  c.train.weight_decay = 0.0
  c.train.label_smoothing = 0.1
  c.train.steps = 1500
  c.train.log_every_steps = 50
  c.eval.every_steps = 500
  c.eval.batch_size = 200
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 2
  return c
