"""The LSTM text classifier: `python -m examples.lstm_classifier.train --workdir=runs/lstm
--config.data=FILE.jsonl --config.tokenizer=RUN`. The split keys (val_fraction, seed) and seq_len
default to configs/finetune.py:classification's, so both classifiers hold out the same examples."""
from ml_collections import ConfigDict


def get_config():
  return ConfigDict({
      "data": "",             # {"text": ..., "label": ...} lines (or .parquet / Arrow), as finetune reads
      "tokenizer": "",        # a run directory (its tokenizer) or a tokenizer.model / tokenizer.json
      "seq_len": 128,         # tokens per example: the text cut to seq_len - 1, then eos
      "val_fraction": 0.1,    # finetune.val_fraction
      "seed": 0,              # train.seed: draws the held-out split (and the init, the batches)
      "embed_dim": 128,       # the token embedding
      "hidden_dim": 256,      # the LSTM's state
      "batch_size": 32,       # examples per step
      "learning_rate": 3e-3,  # Adam
      "steps": 600,           # may be raised to train a finished run further
      "log_every": 50,        # train records in WORKDIR/metrics.jsonl
      "eval_every": 200,      # val numbers, printed (and at step 0 and the end)
      "checkpoint_every": 200,  # Orbax checkpoints in WORKDIR/checkpoints (and at the end)
  })
