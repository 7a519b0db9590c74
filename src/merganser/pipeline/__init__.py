"""From a recipe to a written model: parse the recipe, plan from headers, stream tensors through a
method, write. Also the commands built on that path (moe, extract-lora, plan preview).
"""
