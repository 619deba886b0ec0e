"""The three evaluation tasks of the paper: their instruction templates and their metrics.

A task says how a benchmark is asked and scored; datasets (``sam_mllm.data.datasets``) say where
its samples live. Templates follow the benchmarks' sources (DEMON for storytelling and change
captioning, the SAM authors' prompt for group captioning).
"""

from __future__ import annotations

from dataclasses import dataclass

from sam_mllm.registry import register

PAPER_METRICS = ("rouge_l", "cider", "bleu4")


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    instructions: tuple[str, ...]
    metrics: tuple[str, ...] = PAPER_METRICS

    def instruction(self, index: int = 0, **fields: str) -> str:
        """Template ``index`` with its ``{...}`` fields filled in."""
        return self.instructions[index % len(self.instructions)].format(**fields)


STORY_TEMPLATES = (
    "Given the stories paired with the first several images, can you finish the story based on the last image?",
    "With the narratives paired with the initial images, how would you conclude the story using the last picture?",
    "Given the story so far from the first few images, can you complete the tale considering the final image?",
    "Based on the narratives associated with the initial images, use the final picture to bring the story to a close.",
    "Using the preceding stories paired with the images, can you draft the ending with reference to the last image?",
    "With the stories connected to the initial pictures, how would you write the climax based on the last picture?",
    "Taking the stories from the initial images into account, can you conclude the story using the elements of "
    "the final image?",
    "From the narratives given with the initial images,  write the conclusion using the final image",
    "Given the progression of the story with the first few images, can you write a fitting end considering the "
    "last image?",
    "Based on the stories accompanying the first images, can you devise a conclusion for the story that "
    "incorporates the last image?",
)

GROUP_CAPTIONING = register("task", "group_captioning")(Task(
    name="group_captioning",
    description="Name what a group of images has in common (Conceptual, Animal, Vehicle).",
    instructions=("Sum up the common factor in these {count} pictures in a single statement.",),
))
STORYTELLING = register("task", "storytelling")(Task(
    name="storytelling",
    description="Finish a story from captioned images and a last, uncaptioned one (AESOP, VIST, DM800K).",
    instructions=STORY_TEMPLATES,
))
CHANGE_CAPTIONING = register("task", "change_captioning")(Task(
    name="change_captioning",
    description="Describe what differs between two images (IEdit, Spot-the-Diff, Birds-to-Words, CLEVR-Change).",
    instructions=(
        "What's the difference between 2 images? ",
        "What's the difference between 2 birds? ",
        "Please give a editing Request to describe the transformation from the source image to the target image.",
    ),
))

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
