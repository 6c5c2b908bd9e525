"""The tuners (PEFT methods) of peft-ext, one subpackage each in PEFT's layout: config.py, layer.py, model.py."""
