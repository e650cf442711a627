"""evaluate: not implemented yet."""

from phi3flow.errors import not_implemented

if __name__ == "__main__":
    not_implemented("evaluate")
