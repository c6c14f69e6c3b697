"""The embedded toy domain (coloured shapes): captions and renders, the judge, evaluation, training, tiny-model builders, and the bundled models."""
