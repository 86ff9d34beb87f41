"""What runs a model over videos: evaluation (:mod:`.evaluate`) and feature extraction
(:mod:`.extract`) on their shared inference loop (:mod:`.inference`), training (:mod:`.train`), the
benchmark (:mod:`.bench`), where the model looks (:mod:`.explain`), the web demo (:mod:`.demo`) and
the ``uniformer-fast`` command (:mod:`.cli`)."""
