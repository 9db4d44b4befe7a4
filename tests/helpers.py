"""Call the `padd` CLI from tests with keyword flags: padd("decompose", top_k=2) -> --top-k 2."""

from padd.cli import main


def padd(command: str, **flags) -> int:
    argv = [command]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + name.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return main(argv)
