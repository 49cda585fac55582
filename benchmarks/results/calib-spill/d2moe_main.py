import sys
from d2moe.cli import main
sys.argv[0] = "d2moe"
main()
