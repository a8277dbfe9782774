"""Pure domain: the Device aggregate and the published event schema. No I/O, clock or randomness."""
