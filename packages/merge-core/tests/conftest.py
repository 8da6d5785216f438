import sys
from pathlib import Path

# importlib import mode does not put the test folder on sys.path; the ToMe oracle lives here.
sys.path.insert(0, str(Path(__file__).parent))
