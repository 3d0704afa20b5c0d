"""Your own model and data in a prunetune spec: `examples.tiny_resnet:build` (a model factory)
and `examples.digits_data:load` (a dataset factory), swept by sweeps/custom_digits.yaml."""
