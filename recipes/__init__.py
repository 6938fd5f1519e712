"""Shipped recipes (YAML), installed as `quantkit.recipes`; `quantkit recipes` lists them."""

if __name__ != "quantkit.recipes":  # imported as a bare `recipes` from the repository root
    from quantkit.shadowing import hand_over

    hand_over(__name__, __file__)
