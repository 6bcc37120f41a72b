"""Masked training with prior preservation (see ``masked_training_helper``)."""
