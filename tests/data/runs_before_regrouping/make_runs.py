"""Writes tiny workdirs with the code at the working directory's commit (run in a worktree of
59fa408, the last commit before the move): a tokenizer with every optional state field (GAN,
EMA, LeCam), a class-conditional VIM on it, and a classifier."""

import os
import sys

import jax

from configs import classifier as classifier_config
from configs import vim_base, vitvq_base
from vim_jax import train_classifier, train_vim, train_vitvq

out = sys.argv[1]
devices = jax.devices()[:1]
c = vitvq_base.get_config("tiny")
c.update(
    total_steps=2, eval_every=2, checkpoint_every=2, num_eval_images=8, log_every=1, ema_decay=0.9
)
c.discriminator.lecam_weight = 0.001
c.discriminator.update(channel_base=256, max_channels=16)
tok = os.path.join(out, "tokenizer")
train_vitvq.train_and_evaluate(c, tok, devices=devices)
v = vim_base.get_config("tiny")
v.update(
    tokenizer_workdir=tok,
    total_steps=2,
    log_every=1,
    eval_every=2,
    checkpoint_every=2,
    num_grid_images=6,
    num_eval_images=8,
)
train_vim.train_and_evaluate(v, os.path.join(out, "vim"), devices=devices)
k = classifier_config.get_config()
k.update(total_steps=2, num_eval_images=16)
train_classifier.train_and_evaluate(k, os.path.join(out, "classifier"), devices=devices)
