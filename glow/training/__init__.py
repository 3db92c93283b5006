"""Training: the trainer loop and its optimizer, schedule and EMA."""
