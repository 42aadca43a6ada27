"""Params: one frozen dataclass per params.yaml section (each field's docstring is the one
home of its meaning, its default the one default), loading and validation with one-line
errors, and the params reference generated from them."""
