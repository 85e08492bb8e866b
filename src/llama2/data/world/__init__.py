"""The built-in world: invented people and towns generated from a seed, questions with exact answers, and a
programmatic gold judge, so every stage of the recipe can be measured against truth rather than against the
reward models it optimises. entities.py makes the world, items.py its questions, judge.py judges answers,
files.py writes the data files every stage reads (`builtin:world/NAME`)."""

from .entities import World, WorldSpec, generate_world
from .files import data_path, ensure_world, load_world, read_gold
from .items import ANSWER_TOKENS, FAMILIES, HELPFUL_FAMILIES, SAFETY_FAMILIES, GoldItem
from .judge import Verdict, is_refusal, judge, rating_of

__all__ = ["ANSWER_TOKENS", "FAMILIES", "HELPFUL_FAMILIES", "SAFETY_FAMILIES", "GoldItem", "Verdict", "World",
           "WorldSpec", "data_path", "ensure_world", "generate_world", "is_refusal", "judge", "load_world", "rating_of",
           "read_gold"]
