"""Memory estimates of a training run (``wantrainer estimate``), computed before anything is loaded."""
