"""Videos to clips: decoding and the official test sampling (:mod:`.video`), dataset lists
(:mod:`.lists`), the training recipe's augmentations (:mod:`.augment`) and training clips
(:mod:`.training`). Nothing here imports the model or the applications (:mod:`uniformer_fast.apps`)."""
