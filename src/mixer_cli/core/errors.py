"""The one exception type that means "the user asked for something wrong".

The CLI turns it into one readable line and exit status 2; library callers get a ValueError.
"""


class UserError(ValueError):
    pass
