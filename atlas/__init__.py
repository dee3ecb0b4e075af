import logging

# torchao (module.optimizer=adamw8bit|adamw4bit) is imported by transformers and peft whenever it
# is installed. Its import logs a torch pytree deprecation warning per enum it registers, and one
# line per CUDA kernel library a CPU machine cannot load. The entry points' errors are one line.
for _name in ("torch.utils._pytree", "torchao"):
    logging.getLogger(_name).setLevel(logging.ERROR)
