"""peft-ext: parameter-efficient continual fine-tuning methods for Hugging Face PEFT.

Importing this package registers its methods with PEFT (``PeftType.RESORA``, ``PeftType.ANA``,
``PeftType.MOECL``), after which ``get_peft_model``, ``PeftModel.from_pretrained`` and friends work with
:class:`ReSoRAConfig`, :class:`AnAConfig` and :class:`MoECLConfig` exactly as with PEFT's built-in methods.
Each registration also describes the method (:data:`METHODS`), which the training side, the command line, the Hub
card and the preset catalogue read; :func:`register_method` adds a method of your own the same way.
"""

__version__ = "0.1.0.dev0"

from .registry import METHODS, MethodInfo, method_info, register_method, registered_methods  # noqa: E402, I001

# peft_ext.tuners describes PEFT's LoRA (the baseline of continual runs); each of peft-ext's own methods registers
# itself when its subpackage is imported, in the order the command line lists them.
from .tuners.resora import ReSoRAConfig, ReSoRAModel  # noqa: E402
from .tuners.ana import AnAConfig, AnAModel  # noqa: E402
from .tuners.moecl import MoECLConfig, MoECLModel  # noqa: E402


__all__ = [
    "__version__",
    "METHODS",
    "MethodInfo",
    "AnAConfig",
    "AnAModel",
    "MoECLConfig",
    "MoECLModel",
    "ReSoRAConfig",
    "ReSoRAModel",
    "method_info",
    "register_method",
    "registered_methods",
]
