"""Dataset generators (offline, deterministic, atomic): ``emoji`` (trimodal, 14 languages), ``words``
(frequent words spoken by espeak-ng), ``synthetic`` (tiny test data); ``mmalign data <name>`` runs them."""
