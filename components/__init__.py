"""KFP components: thin wrappers that read inputs, call one distillery function, write outputs.

Every component runs in the project image and needs nothing installed at run time
(`install_kfp_package=False`): the image already has kfp and distillery.
"""

from functools import partial

from kfp import dsl

from distillery.settings import get_settings

component = partial(dsl.component, base_image=get_settings().image, install_kfp_package=False)
