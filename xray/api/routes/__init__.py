"""One router per concern: health, prediction, explanation, training."""
