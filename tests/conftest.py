from fixtures_data import *  # noqa: F401,F403
