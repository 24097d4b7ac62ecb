"""``python -m glmtg ARGS``: the same command as ``glmtg ARGS``.

It hands over to ``glmtg/cli/__main__.py`` rather than importing the CLI, so that the library side of the
package (everything outside ``cli/``) keeps no import of the presentation layer.
"""

import runpy

runpy.run_module("glmtg.cli", run_name="__main__", alter_sys=True)
