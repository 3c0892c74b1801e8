"""Constants shared across the package (token ids of the LLaVA convention)."""

IGNORE_INDEX = -100  # label of positions that carry no next-token loss
IMAGE_TOKEN_INDEX = -200  # placeholder id in input_ids, expanded to image features + task tokens
IMAGE_PLACEHOLDER = "<image>"  # placeholder in conversation text

# token_kind codes recorded per position by the sequence builder
KIND_PAD, KIND_TEXT, KIND_IMAGE = 0, 1, 2
KIND_TASK0 = 3  # task j of model.task_order has kind KIND_TASK0 + j
