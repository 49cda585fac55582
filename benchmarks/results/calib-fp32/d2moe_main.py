import sys
from d2moe.cli import main
sys.argv = ["d2moe", *sys.argv[1:]]
main()
