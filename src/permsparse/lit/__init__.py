"""Lightning shell: modules that train permutation costs of a frozen model, and the learning callback."""

from permsparse.lit.callbacks import PermutationLearning
from permsparse.lit.modules import CausalLMModule, ImageClassifierModule, PermutationModule

__all__ = ["PermutationLearning", "CausalLMModule", "ImageClassifierModule", "PermutationModule"]
