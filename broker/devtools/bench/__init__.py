"""``merlin bench``: the broker's speed beside Ray baselines measured in the same run."""
