"""efflax's implementation modules. Private: import public names from ``efflax.<package>``.

Every public name is re-exported once, by the public package that owns it (``efflax.nn``,
``efflax.optim``, ...), as optax does with ``optax._src``. A public name may equal a module name
here (``efflax.optim.sharpness`` is the function) without shadowing a module users import.
"""
